"""Versioned quantization settings.

A :class:`QuantConfig` is a frozen dataclass. It is written as JSON into the output
folder's ``config.json`` (as ``quantization_config``, with ``quant_method: "quantune"``) and
into the safetensors metadata, and checked on load: an unknown format version or
method is a clear error rather than silently wrong weights.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)  # 2 added module_bits / target_bits (mixed widths); 1 reads as uniform
QUANT_METHOD = "quantune"
METHODS = ("kashin", "rtn")
MIN_BITS, MAX_BITS = 2, 8


class QuantuneError(Exception):
    """A user-facing error: the message is one line that names the problem."""


@dataclass(frozen=True)
class QuantConfig:
    """How every quantized Linear of a model was (or will be) quantized.

    method:      "kashin" (sign-step overdetermined-basis codes) or "rtn" (round to nearest).
    bits:        code width per weight, 2..8.
    group_size:  weights sharing one set of coefficients/scales along the input dimension;
                 None means one per output row. Widths not divisible by it use the largest
                 divisor of the width that is <= group_size (recorded per layer).
    symmetric:   rtn only: symmetric grid with one scale, or asymmetric with scale and minimum.
    transform:   kashin only: "dct" or "hadamard" (seeded, see quantune.transforms).
    u_steps:     kashin only: sign steps spent on U (the rest, bits - u_steps, on V);
                 None means bits - 1: one V step. Measured on SmolLM2-135M (eval/results/
                 variants.jsonl), u-heavy splits win (4-bit: 3u+1v ppl 44 vs 2u+2v 57) and
                 dropping V entirely is catastrophic (4u+0v ppl 2.6e5).
    tied_steps:  kashin only: U's smallest sign steps that share one coefficient, doubling from step to step
                 (``c_{t+1} = 2 c_t``), so their bits decode as one integer and the GPU's few-token kernel
                 reads them as one plane (4-bit codes: three planes' arithmetic instead of four). U's first
                 (largest) step always keeps its own coefficient, so a layer ties min(tied_steps, u_steps - 1)
                 steps, and fewer than 2 tie nothing. 0 (the default) ties none: at 4 bits the tie of two
                 changed perplexity by -1.8% / +2.5% on SmolLM2-135M (per row / groups of 128) and by +5.8% /
                 +2.2% on gemma-3-270m, KL -6% to +14% (eval/results/notes.md, twenty-fourth session), so it is a
                 speed option: the H200's GEMV ran 4-25% faster with two tied on the large shapes, per row and in
                 groups, but 6% slower at 4096x4096 per row (twenty-fourth and twenty-fifth sessions). Folders
                 written before this field read as 0.
    sweeps:      kashin only: block-coordinate refinement sweeps after the greedy steps.
    seed:        seed of the random signs of the transform.
    skip_modules: module-name suffixes kept in full precision in addition to the output head.
    target_bits: a fractional average code width asked for (``--bits 3.5``); None for uniform.
    module_bits: ``{module name: bits}`` for layers whose width differs from ``bits`` (mixed
                 widths chosen by measured sensitivity, see quantune.quantize.allocate_bits).
    """

    method: str = "kashin"
    bits: int = 4
    group_size: int | None = None
    symmetric: bool = True
    transform: str = "dct"
    u_steps: int | None = None
    tied_steps: int = 0
    sweeps: int = 6
    seed: int = 0
    skip_modules: tuple[str, ...] = ()
    target_bits: float | None = None
    module_bits: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    modules_in_full_precision: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.method not in METHODS:
            raise QuantuneError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise QuantuneError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 8):
            raise QuantuneError(f"group size must be an integer >= 8 (or none for per-row), got {self.group_size!r}")
        if self.transform not in ("dct", "hadamard"):
            raise QuantuneError(f"unknown transform {self.transform!r}; choose dct or hadamard")
        if self.u_steps is not None and not 0 <= self.u_steps <= self.bits:
            raise QuantuneError(f"u_steps must lie in [0, bits={self.bits}], got {self.u_steps}")
        if not isinstance(self.tied_steps, int) or not 0 <= self.tied_steps <= MAX_BITS:
            raise QuantuneError(f"tied_steps must be an integer from 0 to {MAX_BITS}, got {self.tied_steps!r}")
        if self.sweeps < 0:
            raise QuantuneError(f"sweeps must be >= 0, got {self.sweeps}")
        for name, b in self.module_bits.items():
            if not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
                raise QuantuneError(f"bits of {name} must be an integer from {MIN_BITS} to {MAX_BITS}, got {b!r}")
            if self.u_steps is not None and self.u_steps > b:
                raise QuantuneError(f"u_steps={self.u_steps} exceeds the {b} bits of {name}")
        if self.target_bits is not None and not MIN_BITS <= self.target_bits <= MAX_BITS:
            raise QuantuneError(f"target bits must lie in [{MIN_BITS}, {MAX_BITS}], got {self.target_bits}")
        if self.format_version not in READABLE_FORMAT_VERSIONS:
            raise QuantuneError(
                f"quantization format version {self.format_version} is not supported by this "
                f"quantune (it reads versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))}); "
                "upgrade quantune or re-quantize"
            )

    @property
    def ku(self) -> int:
        return self.bits - 1 if self.u_steps is None else self.u_steps

    @property
    def kv(self) -> int:
        return self.bits - self.ku

    @property
    def tied(self) -> int:
        """U's sign steps tied into one doubling coefficient (0: none), see ``tied_steps``."""
        tied = min(self.tied_steps, self.ku - 1)
        return tied if tied >= 2 else 0

    def for_module(self, name: str) -> "QuantConfig":
        """The uniform config one layer was quantized with (its own width when mixed)."""
        if not self.module_bits and self.target_bits is None:
            return self
        return dataclasses.replace(self, bits=self.module_bits.get(name, self.bits), module_bits={},
                                   target_bits=None, modules_in_full_precision={})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["skip_modules"] = list(self.skip_modules)
        d["quant_method"] = QUANT_METHOD
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        d = dict(d)
        if d.pop("quant_method", QUANT_METHOD) != QUANT_METHOD:
            raise QuantuneError("quantization_config is not a quantune config (quant_method differs)")
        if "format_version" not in d:
            raise QuantuneError("quantization_config has no format_version: not written by quantune")
        if d["format_version"] not in READABLE_FORMAT_VERSIONS:
            cls(format_version=d["format_version"])  # raises the clear version error
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise QuantuneError(f"quantization_config has unknown fields {sorted(unknown)}")
        d["skip_modules"] = tuple(d.get("skip_modules", ()))
        d.setdefault("tied_steps", 0)  # written before the field: every coefficient was free
        return cls(**d)

    def replace(self, **changes) -> "QuantConfig":
        return dataclasses.replace(self, **changes)
