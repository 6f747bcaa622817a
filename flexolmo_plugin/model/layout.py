"""How a FlexOlmo model is split over processes: the one parallel-layout type.

The Python API (``from_hf`` / ``from_mcore``), the Bridge recipes and the production cluster layouts
all describe parallelism with :class:`ParallelLayout`; :func:`check_layout` refuses splits that
would compute something else or crash deep inside Megatron.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flexolmo_plugin.errors import ConfigError

if TYPE_CHECKING:
    from flexolmo_plugin.model.config import FlexOlmoConfig


@dataclass(kw_only=True, frozen=True)
class ParallelLayout:
    """How the model is split over processes; must match ``megatron.core.parallel_state``."""

    tensor_parallel: int = 1
    expert_parallel: int = 1
    expert_tensor_parallel: int | None = None  # None: same as tensor_parallel (Megatron default)
    pipeline_parallel: int = 1
    sequence_parallel: bool = False

    @classmethod
    def current(cls, *, sequence_parallel: bool = False) -> "ParallelLayout":
        """The layout of the initialised ``parallel_state``."""
        from megatron.core import parallel_state as ps

        return cls(
            tensor_parallel=ps.get_tensor_model_parallel_world_size(),
            expert_parallel=ps.get_expert_model_parallel_world_size(),
            expert_tensor_parallel=ps.get_expert_tensor_parallel_world_size(),
            pipeline_parallel=ps.get_pipeline_model_parallel_world_size(),
            sequence_parallel=sequence_parallel,
        )


def check_layout(config: "FlexOlmoConfig", layout: ParallelLayout) -> None:
    """Reject splits that would silently compute something else (or crash deep inside Megatron)."""
    tp, ep = layout.tensor_parallel, layout.expert_parallel
    etp = layout.expert_tensor_parallel or tp
    problems = []
    if config.num_attention_heads % tp:
        problems.append(f"num_attention_heads={config.num_attention_heads} not divisible by TP={tp}")
    if config.num_key_value_heads % tp:
        problems.append(f"num_key_value_heads={config.num_key_value_heads} not divisible by TP={tp} "
                        "(full-width k-norm needs whole KV heads per rank)")
    if config.num_experts % ep:
        problems.append(f"num_experts={config.num_experts} not divisible by EP={ep}")
    if config.intermediate_size % etp:
        problems.append(f"intermediate_size={config.intermediate_size} not divisible by expert TP={etp}")
    if config.padded_vocab_size % tp:
        problems.append(f"padded vocab {config.padded_vocab_size} not divisible by TP={tp}")
    if layout.pipeline_parallel != 1:
        problems.append("pipeline parallelism is not supported yet")
    if problems:
        raise ConfigError("parallel layout does not fit the model: " + "; ".join(problems))
