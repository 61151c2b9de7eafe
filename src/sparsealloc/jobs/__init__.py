"""The commands' work, one module each: prune, eval, allocate, probe, compare.

Each job validates its inputs before loading anything, clears only its own stale outputs when
the work starts, and writes its result last and atomically (:mod:`.common`).
"""
