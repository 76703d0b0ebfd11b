"""Image analysis pipeline: bytes -> decoded image -> faces -> gender and age. No database, no watcher."""
