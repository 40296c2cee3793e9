"""NSAConfig: the sparsity hyper-parameters of docs/semantics.md, validated once, frozen."""
from __future__ import annotations

from dataclasses import dataclass, fields

from .core import num_compressed


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_compression(cmp_block_size, cmp_stride) -> None:
    check_int("cmp_block_size", cmp_block_size, 1)
    check_int("cmp_stride", cmp_stride, 1)
    if cmp_block_size % cmp_stride:
        raise ValueError(f"cmp_stride ({cmp_stride}) must divide cmp_block_size ({cmp_block_size})")


@dataclass(frozen=True)
class NSAConfig:
    """Paper defaults (arXiv 2502.11089, Section 4.1): l=32, d=16, l'=64, n=16, w=512."""

    cmp_block_size: int = 32    # l: keys summarised by one compressed token
    cmp_stride: int = 16        # d: stride between compressed tokens
    sel_block_size: int = 64    # l': selection block size
    sel_block_count: int = 16   # n: selected blocks per query, forced ones included
    sel_init_blocks: int = 1    # leading blocks always selected
    sel_local_blocks: int = 2   # most recent blocks always selected
    window_size: int = 512      # w: sliding window, the query's own position included

    def __post_init__(self) -> None:
        for name in ("cmp_block_size", "cmp_stride", "sel_block_size", "sel_block_count", "window_size"):
            check_int(name, getattr(self, name), 1)
        for name in ("sel_init_blocks", "sel_local_blocks"):
            check_int(name, getattr(self, name), 0)
        check_compression(self.cmp_block_size, self.cmp_stride)
        l, d, lp = self.cmp_block_size, self.cmp_stride, self.sel_block_size
        if lp % d:
            raise ValueError(f"cmp_stride ({d}) must divide sel_block_size ({lp})")
        if l > lp:
            raise ValueError(f"cmp_block_size ({l}) must be <= sel_block_size ({lp})")
        forced = self.sel_init_blocks + self.sel_local_blocks
        if self.sel_block_count < forced:
            raise ValueError(
                f"sel_block_count ({self.sel_block_count}) must be >= sel_init_blocks + "
                f"sel_local_blocks ({self.sel_init_blocks} + {self.sel_local_blocks} = {forced})")

    def num_compressed(self, seqlen: int) -> int:
        """Tc(T) (docs/semantics.md §1): compressed tokens of a sequence of length T."""
        return num_compressed(seqlen, self.cmp_block_size, self.cmp_stride)

    def replace(self, **changes) -> "NSAConfig":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = set(changes) - set(values)
        if unknown:
            raise TypeError(f"unknown NSAConfig field(s): {sorted(unknown)}")
        values.update(changes)
        return NSAConfig(**values)


def resolve_config(config: NSAConfig | None, **kwargs) -> NSAConfig:
    """Merge a config and explicit kwargs (None = not given); a conflict is an error."""
    if config is not None and not isinstance(config, NSAConfig):
        raise TypeError(f"config must be an NSAConfig, got {type(config).__name__}")
    base = config if config is not None else NSAConfig()
    given = {k: v for k, v in kwargs.items() if v is not None}
    if config is not None:
        clash = {k: (v, getattr(config, k)) for k, v in given.items() if getattr(config, k) != v}
        if clash:
            raise ValueError(f"keyword arguments contradict config: {clash} (given, config)")
    return base.replace(**given) if given else base
