"""init_weights: every from-scratch initialisation of the transformer in one place (DiT's adaLN-Zero recipe).

Zeroed modulation makes every gate 0 at the start, so each block begins as the identity; the zeroed final layer
makes the first prediction 0. Gradients still flow: the gates' own weights get gradients on the first step.
"""

from __future__ import annotations

import torch
from torch import nn

from fluxion.model.transformer import Flux2, Modulation, RMSNorm


@torch.no_grad()
def init_weights(model: Flux2, generator: torch.Generator | None = None) -> Flux2:
    for module in model.modules():
        if isinstance(module, nn.Linear):
            # Xavier keeps activations' scale through the wide fused projections (linear1 is [9D, D]).
            bound = (6.0 / (module.in_features + module.out_features)) ** 0.5
            module.weight.uniform_(-bound, bound, generator=generator)
        elif isinstance(module, RMSNorm):
            module.scale.fill_(1.0)
    for embedder in (model.time_in, model.guidance_in):
        if embedder is not None:
            embedder.in_layer.weight.normal_(0.0, 0.02, generator=generator)
            embedder.out_layer.weight.normal_(0.0, 0.02, generator=generator)
    for module in model.modules():
        if isinstance(module, Modulation):
            module.lin.weight.zero_()
    model.final_layer.adaLN_modulation[1].weight.zero_()
    model.final_layer.linear.weight.zero_()
    return model
