"""Beyond one machine: expert parallelism on torch.distributed, and the arithmetic of scale.

    expert_parallel  the MoE layer with its experts sharded over processes (all-to-all)
    check            proves it equal to the single-process layer (outputs, all gradients)
    train            expert-parallel training of the toy under torchrun
    node_limited     node-limited routing and the bytes it saves
    placement        redundant experts placed from routing statistics (DeepSeek-V3 §3.4)
    schedule         pipeline schedules 1F1B, ZB1P, DualPipe simulated event by event
    comm             bytes and link times of dispatch and combine for the published presets
    bench            forward + backward time of the layer and the all-to-all's share

Submodules are imported on demand (``import minimoe.parallel.schedule``): importing this
package starts no process group and needs none.
"""
