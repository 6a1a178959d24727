"""Where training memory goes: weights, gradients, optimizer states, fp32 masters,
activations and other, for full fine-tuning (fpft) and HiFT side by side.

``estimate`` needs no weights: the model is built on the meta device from its config,
activations are the bytes autograd saves in a meta forward pass (each storage counted
once, parameters excluded), and optimizer-state bytes come from stepping the configured
optimizer on meta tensors. Models whose forward pass cannot run on meta tensors are
measured on a real 2-block CPU sample instead, scaled to the configured shape.
``hift_cli.memprofile.measure`` measures the same categories on real steps.

With ``memprofile.world_size`` N > 1 every row is per GPU for ``trainer.shard_weights``
(FSDP2 over N processes): :func:`fsdp_shard` gives what one GPU keeps, and the rows add
the full weights of the two units gathered at once and one unit's unsharded gradient.

The package, by concern (imports point down this list):

- ``inputs``: :class:`EstimateInput`, what the estimate depends on (from a config, or
  from a set-up trainer: its device, offload decision and processes as resolved);
- ``counting``: the meta model and its CPU sample, optimizer-state bytes, the update's
  temporaries, FSDP2 shards;
- ``activations``: saved bytes of a forward pass, per block, as the GPU kernels save them;
- ``sample``: the CPU-sample fallback for models whose meta forward pass fails;
- ``arithmetic``: :class:`Estimator`, each group's row of bytes;
- ``search``: ``hift.k=auto``'s grouping and the largest batch under a budget;
- ``report``: :func:`estimate`'s report, and its rendering for ``hift memprofile``.
"""

from hift_cli.memory.activations import (SavedBytes, activation_bytes, counting_kernels,
                                         fixed_shape_batches)
from hift_cli.memory.arithmetic import Estimator
from hift_cli.memory.counting import (CATEGORIES, GIB, SAMPLE_BLOCKS, LiveBytes, Settings,
                                      fsdp_shard, gib, meta_model, optimizer_state_bytes,
                                      sample_model, update_temporaries)
from hift_cli.memory.inputs import EstimateInput
from hift_cli.memory.report import budget_lines, estimate, render, render_groups
from hift_cli.memory.search import NoGroupingFits, build_groups, resolve_grouping

__all__ = ["CATEGORIES", "GIB", "SAMPLE_BLOCKS", "EstimateInput", "Estimator", "LiveBytes",
           "NoGroupingFits", "SavedBytes", "Settings", "activation_bytes", "budget_lines",
           "build_groups", "counting_kernels", "estimate", "fixed_shape_batches", "fsdp_shard",
           "gib", "meta_model", "optimizer_state_bytes", "render", "render_groups",
           "resolve_grouping", "sample_model", "update_temporaries"]
