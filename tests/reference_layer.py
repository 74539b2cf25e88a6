"""SlimGPT's previous per-layer step, which ran each layer's attention four times: tests/test_throughput.py prunes
with it (`pipeline._prune_pass(..., layer_step=reference_layer)`) and with the pipeline's own step and compares."""
from slimgpt_core.methods.forwards import collect_hessian, run_layer
from slimgpt_core.methods.pipeline import _prune_attention, _prune_mlp, _Streams
from slimgpt_core.methods.prune_settings import PruneSettings


def reference_layer(layer, i, st: _Streams, settings: PruneSettings, plan, emit, phase, done, stats) -> None:
    """The previous implementation of a layer's step (pipeline._layer_once's signature): four attention passes."""
    head_ratio, head_rm, ffn_ratio, ffn_rm = plan
    bs, tf32 = settings.batch_size, settings.tf32
    calib_in = st.pruned_in if settings.sequential else st.dense_in
    dense = i == 0 or not settings.sequential
    if st.dense_out is not None:
        run_layer(layer, st.dense_in, st.kwargs, bs, st.dense_out, tf32)
    H = stats.hessian(i, "attn", lambda: collect_hessian(layer, layer.self_attn.o_proj, calib_in, st.kwargs, bs,
                                                         tf32), dense)
    _prune_attention(layer, i, H, settings, head_ratio, head_rm, emit, phase, done)
    H = stats.hessian(i, "mlp", lambda: collect_hessian(layer, layer.mlp.down_proj, calib_in, st.kwargs, bs, tf32),
                      dense and head_rm == 0)
    _prune_mlp(layer, i, H, settings, ffn_ratio, ffn_rm, emit, phase, done)
    if st.pruned_out is not None:
        run_layer(layer, st.pruned_in, st.kwargs, bs, st.pruned_out, tf32)
