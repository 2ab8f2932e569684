"""Sizes of a frame cache, in latent frames: sink, attention window, residency, recache, bank."""

from __future__ import annotations

from dataclasses import dataclass

RECACHE_RULES = ("longlive", "memflow")


@dataclass(frozen=True)
class CachePolicy:
    """Sizes of the cache, in latent frames (LongLive's defaults).

    ``recache_size``: frames re-encoded at a prompt switch: None = ``local_attn_size`` (LongLive;
    every frame with global attention), -1 = every frame before the switch, else that many (the
    KVPO code's ``recache_full_kv_cache_after_switch`` uses ``resident_frames``).

    ``recache_rule``: how the recache runs its frames (:mod:`kvpo.models.prompt_switch`):
    ``"longlive"`` in passes of at most ``max(21, local_attn_size)`` frames, ``"memflow"`` in one
    pass (MemFlow's ``recache_after_switch`` re-encodes ``local_attn_size`` frames, it has no
    ``recache_size``).

    ``bank_size``: frames of MemFlow's memory bank per layer (0: no bank, LongLive);
    ``record_interval``: a block starting at a multiple of ``frames_per_block * record_interval``
    frames records its first frame into the bank (:mod:`kvpo.models.memory_bank`); ``sma``:
    MemFlow's sparse memory activation (each head attends to 3 of the sink and bank frames,
    :mod:`kvpo.models.sparse_memory`).
    """

    sink_size: int = 3
    local_attn_size: int = 12
    resident_frames: int = 33
    frames_per_block: int = 3
    recache_size: int | None = None
    bank_size: int = 0
    record_interval: int = 3
    sma: bool = False
    recache_rule: str = "longlive"

    def __post_init__(self) -> None:
        if self.frames_per_block < 1 or self.sink_size < 0:
            raise ValueError(
                f"need frames_per_block >= 1 and sink_size >= 0, got {self.frames_per_block} "
                f"and {self.sink_size}"
            )
        if self.local_attn_size != -1 and self.local_attn_size < self.frames_per_block:
            raise ValueError(
                f"local_attn_size={self.local_attn_size} must be -1 (global) or at least "
                f"frames_per_block={self.frames_per_block}"
            )
        if self.recache_size is not None and self.recache_size < 1 and self.recache_size != -1:
            raise ValueError(f"recache_size must be None, -1 or >= 1, got {self.recache_size}")
        if self.recache_rule not in RECACHE_RULES:
            raise ValueError(
                f"recache_rule must be one of {RECACHE_RULES}, got {self.recache_rule!r}"
            )
        if self.recache_rule == "memflow" and self.recache_size is not None:
            raise ValueError(
                "recache_rule 'memflow' re-encodes the last local_attn_size frames (MemFlow's "
                f"recache has no full-cache option); got recache_size={self.recache_size}"
            )
        if self.bank_size < 0 or self.record_interval < 1:
            raise ValueError(
                f"need bank_size >= 0 (0: no memory bank) and record_interval >= 1, got "
                f"bank_size={self.bank_size}, record_interval={self.record_interval}"
            )
        if self.resident_frames != -1:
            need = max(self.local_attn_size, self.sink_size + self.frames_per_block)
            if self.local_attn_size == -1 or self.resident_frames < need:
                raise ValueError(
                    f"resident_frames={self.resident_frames} must be -1 (keep everything) or at "
                    f"least local_attn_size={self.local_attn_size} and sink_size + "
                    f"frames_per_block = {self.sink_size + self.frames_per_block} "
                    "(global attention needs resident_frames=-1)"
                )

    def resident_start(self, start_frame: int, num_frames: int) -> int:
        """First non-sink frame kept while the block ``[start_frame, +num_frames)`` runs."""
        if self.resident_frames == -1:
            return self.sink_size
        capacity = self.resident_frames - self.sink_size
        return max(self.sink_size, start_frame + num_frames - capacity)

    def records(self, start_frame: int) -> bool:
        """Whether the block starting at ``start_frame`` records its first frame into the bank."""
        step = self.frames_per_block * self.record_interval
        return self.bank_size > 0 and start_frame % step == 0

    def bank_pages(self, num_layers: int, num_frames: int) -> int:
        """Most distinct bank pages one row holds in a video of ``num_frames`` frames: every
        record, at most ``num_layers * (bank_size - 1) + 1`` (each layer keeps its own frames),
        plus the pending one; 0 without a bank."""
        if self.bank_size == 0:
            return 0
        step = self.frames_per_block * self.record_interval
        records = -(-num_frames // step)
        return min(records, num_layers * max(self.bank_size - 1, 0) + 1) + 1

    def window(self, start_frame: int, num_frames: int) -> list[int]:
        """Cached frames a block attends to by default (sink ++ newest), for local attention."""
        if self.local_attn_size == -1:
            raise ValueError("global attention attends to every resident frame; no fixed window")
        sink = list(range(min(self.sink_size, start_frame)))
        newest = self.local_attn_size - self.sink_size - num_frames
        lo = max(self.sink_size, start_frame - max(newest, 0))
        return sink + list(range(lo, start_frame))

    def recache_frames(self, switch_frame: int) -> range:
        """Frames re-encoded with the new prompt at a switch: the last ``recache_size``."""
        size = self.local_attn_size if self.recache_size is None else self.recache_size
        if size == -1:
            return range(0, switch_frame)
        return range(max(0, switch_frame - size), switch_frame)
