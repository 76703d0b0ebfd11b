"""Getting answers out of the results store: one filter model (:mod:`.filters`), the read queries
(:mod:`.read`), exports (:mod:`.vics` and the CSV/JSON writers in :mod:`.cli`), image access for
annotated copies and crops (:mod:`.media`) and the command-line commands (:mod:`.cli`).
The review page (:mod:`daemon.web`) uses the same filters and queries."""
