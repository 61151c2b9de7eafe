"""What a tuning needs of a session besides pruning and scoring (which each test fakes): the
protocol, the model's cache identity and the on-disk cache (here: always computed afresh)."""

from sparsealloc.protocol import Protocol


class TuningSessionBase:
    protocol = Protocol(calib="c4")
    model_id = "fake"
    weights_fingerprint = "0" * 16
    model = None
    progress = False

    def disk_cached(self, kind, key, compute, valid=lambda _: True, use_cache=True):
        return compute()
