"""How a FlexOlmo model is split over processes: the one parallel-layout type.

The Python API (``from_hf`` / ``from_mcore``), the Bridge recipes and the production cluster layouts
all describe parallelism with :class:`ParallelLayout`; :meth:`ParallelLayout.check` refuses splits
that would compute something else or crash deep inside Megatron, and
:meth:`ParallelLayout.check_cluster` those that would cross nodes or not tile the cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from megatron.core import parallel_state as ps

from flexolmo_plugin.errors import ConfigError

if TYPE_CHECKING:
    from flexolmo_plugin.model.config import FlexOlmoConfig


@dataclass(kw_only=True, frozen=True)
class ParallelLayout:
    """Model parallelism (TP, EP, expert-TP, PP, SP) and, for cluster recipes, where the ranks are.

    ``expert_tensor_parallel=None`` means 1 when tensor and expert parallelism are combined
    (Megatron-Core's recommendation for MoE: experts are then split by EP only), else equal to TP.
    ``gpus_per_node=None`` describes no cluster (a single process group of the model-parallel size).
    """

    tensor_parallel: int = 1
    expert_parallel: int = 1
    expert_tensor_parallel: int | None = None
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    nodes: int = 1
    gpus_per_node: int | None = None

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "expert_parallel", "expert_tensor_parallel", "pipeline_parallel", "nodes",
                     "gpus_per_node"):
            value = getattr(self, name)
            if value is None and name in ("expert_tensor_parallel", "gpus_per_node"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

    @property
    def etp(self) -> int:
        """The expert tensor-parallel size in effect."""
        if self.expert_tensor_parallel is not None:
            return self.expert_tensor_parallel
        return 1 if self.tensor_parallel > 1 and self.expert_parallel > 1 else self.tensor_parallel

    @property
    def world_size(self) -> int:
        if self.gpus_per_node is None:
            raise ConfigError("this layout describes no cluster (gpus_per_node is not set)")
        return self.nodes * self.gpus_per_node

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor_parallel * self.pipeline_parallel)

    @classmethod
    def current(cls, *, sequence_parallel: bool = False) -> ParallelLayout:
        """The layout of the initialised ``parallel_state``."""

        return cls(
            tensor_parallel=ps.get_tensor_model_parallel_world_size(),
            expert_parallel=ps.get_expert_model_parallel_world_size(),
            expert_tensor_parallel=ps.get_expert_tensor_parallel_world_size(),
            pipeline_parallel=ps.get_pipeline_model_parallel_world_size(),
            sequence_parallel=sequence_parallel,
        )

    def megatron_fields(self) -> dict[str, Any]:
        """The ``TransformerConfig`` / Bridge provider fields of this layout."""
        return dict(tensor_model_parallel_size=self.tensor_parallel, expert_model_parallel_size=self.expert_parallel,
                    expert_tensor_parallel_size=self.etp, pipeline_model_parallel_size=self.pipeline_parallel,
                    sequence_parallel=self.sequence_parallel)

    def check(self, config: FlexOlmoConfig) -> None:
        """Reject splits that would silently compute something else (or crash deep inside Megatron)."""
        tp, ep, etp = self.tensor_parallel, self.expert_parallel, self.etp
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
        if self.pipeline_parallel != 1:
            problems.append("pipeline parallelism is not supported yet")
        if problems:
            raise ConfigError("parallel layout does not fit the model: " + "; ".join(problems))

    def check_cluster(self, config: FlexOlmoConfig, *, global_batch_size: int, micro_batch_size: int) -> None:
        """Refuse splits that cross nodes, do not tile the cluster, or do not fit the model."""
        self.check(config)
        problems = []
        gpus = self.gpus_per_node
        if gpus is None:
            raise ConfigError("a cluster layout needs gpus_per_node")
        expert_group = self.expert_parallel * self.etp
        if gpus % self.tensor_parallel:
            problems.append(f"TP={self.tensor_parallel} does not divide the {gpus} GPUs of a node "
                            "(TP groups must stay inside a node)")
        if gpus % expert_group:
            problems.append(f"EP x expert-TP={expert_group} does not divide the {gpus} GPUs of a node "
                            "(expert all-to-all must stay on NVLink)")
        per_step = micro_batch_size * self.data_parallel
        if global_batch_size % per_step:
            problems.append(f"global_batch_size={global_batch_size} is not a multiple of micro_batch_size x DP = "
                            f"{micro_batch_size} x {self.data_parallel}")
        if problems:
            raise ConfigError("parallel layout: " + "; ".join(problems))
