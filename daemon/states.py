"""The words the service stores and reports, each set in one place: file states, failure
reasons, why a video's sampling stopped, watcher rescan reasons. They are ``StrEnum`` members, so they are the plain strings the
database, the exports and the log hold (``FileState.DONE == "done"``), and mypy checks every place
that takes one.
"""

from __future__ import annotations

from enum import StrEnum


class FileState(StrEnum):
    """A recorded path's state (the work queue, :mod:`daemon.store.schema`)."""

    QUEUED = "queued"  # to analyse
    WORKING = "working"  # claimed under a lease
    DONE = "done"
    FAILED = "failed"  # bad input, with a reason
    QUARANTINED = "quarantined"  # crashed or hung its worker max_attempts times
    GONE = "gone"  # deleted from disk; results kept


class Reason(StrEnum):
    """Why a file was not analysed (``files.reason``)."""

    # the file or its bytes (daemon.pipeline.images.ImageError)
    EMPTY = "empty"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    TRUNCATED = "truncated"
    TOO_LARGE = "too_large"  # more pixels than limits.max_pixels
    CORRUPT = "corrupt"
    UNREADABLE = "unreadable"
    NOT_REGULAR_FILE = "not_regular_file"
    TOO_BIG_FILE = "too_big_file"  # more bytes than limits.max_file_bytes
    SYMLINK = "symlink"  # a symbolic link where discovery saw a regular file or folder (never followed)
    REPLACED = "replaced"  # another file than the one discovered now has the name
    NO_FRAMES = "no_frames"  # a video without one decodable video frame
    # the analysis (daemon.workers)
    MODEL_OUTPUT = "model_output"  # a model returned values that are not probabilities
    OUT_OF_MEMORY = "out_of_memory"
    INTERNAL_ERROR = "internal_error"
    WORKER_CRASHED = "worker_crashed"
    WORKER_TIMEOUT = "worker_timeout"


IMAGE_REASONS = frozenset(Reason) - {Reason.MODEL_OUTPUT, Reason.OUT_OF_MEMORY, Reason.INTERNAL_ERROR, Reason.WORKER_CRASHED, Reason.WORKER_TIMEOUT}


class VideoCut(StrEnum):
    """Why sampling a video stopped before its end (``videos.cut``); the frames before it are kept."""

    TRUNCATED = "truncated"  # the data ends early
    CORRUPT = "corrupt"  # the data breaks inside
    FRAME_LIMIT = "frame_limit"  # pipeline.video.max_frames frames sampled
    TIME_BUDGET = "time_budget"  # pipeline.video.budget_seconds spent


class Rescan(StrEnum):
    """Why a watcher asks for a root to be walked again (events were or may have been lost)."""

    OVERFLOW = "overflow"  # the kernel's inotify queue overflowed
    OBSERVER_RESTARTED = "observer_restarted"
    HANDLER_ERROR = "handler_error"
    QUEUE_FULL = "queue_full"
    POLLING_FALLBACK = "polling_fallback"
