"""KFAC factors computed independently of `CurvatureCollector`: keep every linear's input and output with forward
hooks, differentiate the loss with torch.autograd. Shared by test_surgeon.py and test_kfac_mutants.py."""
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
