"""KFAC factors computed independently of `CurvatureCollector`: keep every linear's input and output with forward
hooks, differentiate the loss with torch.autograd. Shared by methods/test_surgeon.py and methods/test_kfac.py."""
import torch
import torch.nn.functional as F

from slimgpt_core.methods.curvature import linears


def factors_by_autograd(model, tokens, labels=None, rows=None):
    """A and G of every linear (keys (layer, name)) from kept inputs and autograd gradients of the summed
    per-sequence mean cross-entropy against `labels` (the next tokens when None), over the flattened
    (sequence, position) `rows` (all when None), in fp64."""
    inputs, outputs = {}, {}

    def keep(key):
        def hook(module, args, out):
            inputs[key], outputs[key] = args[0], out
        return hook
    handles = [m.register_forward_hook(keep((i, n)))
               for i, layer in enumerate(model.model.layers) for n, m in linears(layer).items()]
    with torch.enable_grad():
        logits = model(tokens, use_cache=False).logits
    for h in handles:
        h.remove()
    labels = tokens[:, 1:] if labels is None else labels
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    keys = list(outputs)
    grads = torch.autograd.grad(ce.view(tokens.shape[0], -1).mean(1).sum(), [outputs[k] for k in keys])
    A, G = {}, {}
    for key, g in zip(keys, grads):
        g = g.reshape(-1, g.shape[-1]).double()
        x = inputs[key].detach().reshape(-1, inputs[key].shape[-1]).double()
        if rows is not None:
            g, x = g[rows], x[rows]
        G[key], A[key] = g.T @ g / len(g), x.T @ x / len(x)
    return A, G


def assert_factors_close(A, G, A_ref, G_ref, rtol=1e-4, scaled_atol=1e-5):
    """Each collected factor equals the fp64 reference, entry by entry, within rtol of the entry plus
    scaled_atol × sqrt(F_ii F_jj). The factors are fp32 sums of products over rows, and the collector's gradients
    come from another fp32 backward than autograd's, so an entry's error scales with the Cauchy-Schwarz bound of its
    terms, sqrt(F_ii F_jj) (≥ the mean of |x_i x_j|), not with the entry: an entry near zero is a cancellation."""
    for (i, name), g in G_ref.items():
        assert_gram_close(G[i][name].double(), g, rtol, scaled_atol, f"G of layer {i} {name}")
        if name in A[i]:
            assert_gram_close(A[i][name].double(), A_ref[(i, name)], rtol, scaled_atol, f"A of layer {i} {name}")


def assert_gram_close(actual, expected, rtol, scaled_atol, what="Gram matrix"):
    """|actual − expected| ≤ rtol·|expected| + scaled_atol·sqrt(E_ii E_jj) entry by entry, for a mean of outer
    products `expected` (fp64) and its fp32 computation `actual`."""
    d = expected.diagonal().clamp(min=0)
    bound = rtol * expected.abs() + scaled_atol * (d[:, None] * d[None, :]).sqrt()
    excess = (actual - expected).abs() - bound
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert float(excess.max()) <= 0, (f"{what}: off by {float((actual - expected).abs().max()):.3g} "
                                      f"(worst excess over the bound {float(excess.max()):.3g})")
