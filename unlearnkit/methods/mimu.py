"""MIMU: minimally invasive unlearning, by switching weights off with a learned mask.

The model's weights are never changed. A small graph network (the *control unit*) looks at a
sample, the weights of the last one or two linear layers and how that sample uses them, and
picks the ``delta * N`` weights the sample's prediction rests on. A forget request switches off
the weights that the forget samples' masks select far more often than the retained samples'
masks, chunk by chunk, until the forget set's confidence falls below a threshold. The switch is
applied at inference (a functional call with ``mask * W``), so every request can be revoked and
removing all of them gives back the original outputs bit for bit.

Pieces, in the order a lesson meets them:

* :func:`build_parameter_graph`: one node per target weight plus one per neuron, each weight
  linked to its input and output neuron (``O(N)`` edges; two weights sharing a neuron are two
  hops apart).
* :func:`node_features`: per sample, for every weight ``(input activation, output activation,
  weight, gradient of the sample's loss)``, standardised per layer.
* :class:`ControlUnit`: a GCN giving one logit per weight; :func:`gumbel_topk` samples a hard
  top-k mask with a straight-through gradient.
* :func:`train_controller`: minimises ``E_Q[-log p(y|x; m*W)] - E_Q[log P(m|W)] + E_Q[log Q(m)]``.
* :func:`overlap_scores`, :func:`exclusivity`, :func:`plan_forgetting`, :class:`MaskedModel`
  and the registered method :func:`mimu`.
"""

from __future__ import annotations

import hashlib
import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch_geometric.data import Data
from torch_geometric.nn import GCNConv
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from tqdm.auto import tqdm

from ..data import ImageDataset, Split
from ..evaluate import confidences, true_class_confidence
from ..models import Classifier, head_of
from ..train import load_checkpoint, save_checkpoint
from .base import Stopwatch, UnlearningResult, check_call, register

N_FEATURES = 5  # input activation, output activation, weight, gradient, is-a-neuron flag
RANKINGS = ("learned", "saliency", "random")


# --------------------------------------------------------------------------------------------
# Target layers: where the masks live
# --------------------------------------------------------------------------------------------


@dataclass
class Targets:
    """The last ``len(names)`` linear layers of a model, and how to run the model around them.

    Attributes:
        names: qualified parameter names of the target weights in the whole model
            (``"head.weight"``, ``"backbone.4.weight"``).
        shapes: ``[out, in]`` of each target weight.
        prefix: the frozen part before the first target layer (its output feeds the suffix).
        suffix: the target layers and what lies between them, as one ``nn.Sequential`` that shares
            the model's modules (no copy).
        suffix_names: the target weights' names inside ``suffix``.
    """

    names: list[str]
    shapes: list[tuple[int, int]]
    prefix: nn.Module
    suffix: nn.Sequential
    suffix_names: list[str]

    @property
    def sizes(self) -> list[int]:
        """Number of weights in each target layer."""
        return [o * i for o, i in self.shapes]

    @property
    def n_weights(self) -> int:
        """N: the number of maskable weights."""
        return sum(self.sizes)

    def split_flat(self, flat: Tensor) -> list[Tensor]:
        """Cut a ``[..., N]`` tensor into one ``[..., out, in]`` tensor per target layer."""
        parts = flat.split(self.sizes, dim=-1)
        return [p.reshape(*flat.shape[:-1], *shape) for p, shape in zip(parts, self.shapes, strict=True)]


def find_targets(model: nn.Module, layers: int = 1) -> Targets:
    """The last ``layers`` (1 or 2) linear layers of a course model.

    With ``layers=2`` the backbone must be an ``nn.Sequential`` whose last ``nn.Linear`` is
    followed only by parameter-free modules (an activation), as in the course's MLP and CNN.
    """
    head = head_of(model)
    if layers not in (1, 2):
        raise ValueError(f"layers={layers}: MIMU targets the last 1 or 2 linear layers; pass 1 or 2")
    if layers == 1:
        return Targets(["head.weight"], [tuple(head.weight.shape)], model.backbone, nn.Sequential(head),
                       ["0.weight"])
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Sequential):
        raise TypeError("layers=2 needs model.backbone to be an nn.Sequential ending in Linear + activation; "
                        f"got {type(backbone).__name__}. Use layers=1 (the head only).")
    position = max((i for i, m in enumerate(backbone) if isinstance(m, nn.Linear)), default=None)
    if position is None or any(any(True for _ in m.parameters()) for m in backbone[position + 1:]):
        raise TypeError("layers=2 needs a linear layer in model.backbone followed only by parameter-free modules; "
                        "this backbone has none. Use layers=1 (the head only).")
    layer = backbone[position]
    if layer.out_features != head.in_features:
        raise TypeError(f"the backbone's last linear layer gives {layer.out_features} features but the head takes "
                        f"{head.in_features}; use layers=1")
    suffix = nn.Sequential(*backbone[position:], head)
    return Targets([f"backbone.{position}.weight", "head.weight"],
                   [tuple(layer.weight.shape), tuple(head.weight.shape)],
                   backbone[:position], suffix, ["0.weight", f"{len(suffix) - 1}.weight"])


@torch.no_grad()
def prefix_inputs(model: nn.Module, targets: Targets, data: ImageDataset, indices: Tensor,
                  batch_size: int = 2048) -> Tensor:
    """The input of the first target layer for ``data[indices]`` (frozen, float32, eval mode)."""
    was_training = model.training
    model.eval()
    indices = torch.as_tensor(indices).to(data.device)
    try:
        out = [targets.prefix(data.images[indices[s:s + batch_size]]).float()
               for s in range(0, len(indices), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, targets.shapes[0][1], device=data.device)


def _target_weights(model: nn.Module, targets: Targets) -> list[Tensor]:
    params = dict(model.named_parameters())
    return [params[name].detach() for name in targets.names]


def _masked_suffix_params(model: nn.Module, targets: Targets, mask: Tensor) -> dict[str, Tensor]:
    """Every parameter of the suffix, detached (so no gradient ever reaches the model), with the target
    weights multiplied by ``mask`` (which may carry a gradient to whatever produced it)."""
    params = {name: p.detach() for name, p in targets.suffix.named_parameters()}
    weights = _target_weights(model, targets)
    params.update({name: w * m for name, w, m in zip(targets.suffix_names, weights, targets.split_flat(mask),
                                                       strict=True)})
    return params


def suffix_logits(model: nn.Module, targets: Targets, inputs: Tensor, keep: Tensor | None = None) -> Tensor:
    """Logits of the model from the first target layer's ``inputs``, with the target weights
    multiplied by ``keep`` (``[N]``, one mask for all rows) through ``functional_call``."""
    if keep is None:
        return targets.suffix(inputs)
    return functional_call(targets.suffix, _masked_suffix_params(model, targets, keep), (inputs,))


def per_sample_masked_logits(model: nn.Module, targets: Targets, inputs: Tensor, masks: Tensor) -> Tensor:
    """``[B, C]`` logits where row ``b`` uses its own mask ``masks[b]`` (``[B, N]``, differentiable).

    ``vmap`` over ``functional_call`` evaluates B differently masked copies of the target layers
    without ever writing the model's weights.
    """
    def one(mask: Tensor, x: Tensor) -> Tensor:
        return functional_call(targets.suffix, _masked_suffix_params(model, targets, mask), (x[None],))[0]

    return vmap(one)(masks, inputs)


# --------------------------------------------------------------------------------------------
# The parameter graph and the node features
# --------------------------------------------------------------------------------------------


@dataclass
class ParameterGraph:
    """The weight-neuron graph over the target layers.

    Node order: every target weight first (layer by layer, ``W.flatten()`` order, so weight node
    ``j`` is entry ``j`` of a flat mask), then the neurons: the inputs of the first target layer,
    then the outputs of each target layer (the outputs of one layer are the inputs of the next,
    which is how consecutive layers join).

    Attributes:
        data: a ``torch_geometric.data.Data`` with the undirected ``edge_index`` (both directions).
        n_weights: N, the number of weight nodes.
        neuron_sizes: neurons per neuron layer (``[in_0, out_0, out_1, ...]``).
        norm_edge_index, norm_edge_weight: the GCN-normalised adjacency with self-loops,
            ``D^-1/2 (A + I) D^-1/2``, computed once.
        adjacency: the same normalised adjacency as a sparse CSR matrix (rows = receiving nodes).
    """

    data: Data
    n_weights: int
    neuron_sizes: list[int]
    norm_edge_index: Tensor
    norm_edge_weight: Tensor
    adjacency: Tensor

    def propagate(self, h: Tensor) -> Tensor:
        """``A_norm @ h`` for ``[nodes, H]`` or a batch ``[B, nodes, H]`` (one sparse product: the
        batch is folded into the columns, so B samples cost one pass over the edges)."""
        if h.dim() == 2:
            return self.adjacency @ h
        b, n, width = h.shape
        return (self.adjacency @ h.transpose(0, 1).reshape(n, b * width)).reshape(n, b, width).transpose(0, 1)

    @property
    def n_nodes(self) -> int:
        return self.n_weights + sum(self.neuron_sizes)

    def degrees(self) -> Tensor:
        """Degree of every node (weight nodes: 2; neurons: their fan-in or fan-out, or both)."""
        return torch.bincount(self.data.edge_index[0], minlength=self.n_nodes)


def build_parameter_graph(shapes: Sequence[tuple[int, int]], device: torch.device | str = "cpu") -> ParameterGraph:
    """The bipartite weight-neuron graph of consecutive linear layers with weight shapes ``shapes``.

    Weight ``(o, i)`` of layer ``l`` is linked to input neuron ``i`` and output neuron ``o`` of that
    layer: ``2 * N`` undirected edges instead of the ``O(N^2)`` clique of "weights sharing a neuron".
    """
    shapes = [tuple(int(v) for v in s) for s in shapes]
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ValueError(f"shapes must be a non-empty list of [out, in] pairs, got {shapes}")
    for (_, i_next), (o_prev, _) in zip(shapes[1:], shapes[:-1], strict=True):
        if i_next != o_prev:
            raise ValueError(f"consecutive layers do not connect: a layer with {o_prev} outputs is followed by one "
                             f"taking {i_next} inputs")
    n_weights = sum(o * i for o, i in shapes)
    neuron_sizes = [shapes[0][1]] + [o for o, _ in shapes]
    neuron_offsets = [n_weights + sum(neuron_sizes[:k]) for k in range(len(neuron_sizes))]
    sources, targets_, start = [], [], 0
    for layer, (o, i) in enumerate(shapes):
        weight_ids = torch.arange(start, start + o * i).view(o, i)
        inputs = neuron_offsets[layer] + torch.arange(i).expand(o, i)
        outputs = neuron_offsets[layer + 1] + torch.arange(o)[:, None].expand(o, i)
        for neuron in (inputs, outputs):
            sources += [weight_ids.flatten(), neuron.flatten()]
            targets_ += [neuron.flatten(), weight_ids.flatten()]
        start += o * i
    edge_index = torch.stack([torch.cat(sources), torch.cat(targets_)]).to(device)
    n_nodes = n_weights + sum(neuron_sizes)
    norm_index, norm_weight = gcn_norm(edge_index, None, n_nodes, add_self_loops=True)
    # messages flow source -> target, so the receiving node (norm_index[1]) is the matrix row
    with warnings.catch_warnings():  # torch flags sparse CSR as "beta" on every construction
        warnings.simplefilter("ignore", UserWarning)
        adjacency = torch.sparse_coo_tensor(norm_index.flip(0), norm_weight, (n_nodes, n_nodes),
                                            check_invariants=True).coalesce().to_sparse_csr()
    return ParameterGraph(Data(edge_index=edge_index, num_nodes=n_nodes), n_weights, neuron_sizes,
                          norm_index, norm_weight, adjacency)


def _standardise(values: Tensor) -> Tensor:
    """Zero mean, unit variance along the last dimension (per sample, per layer)."""
    return (values - values.mean(-1, keepdim=True)) / values.std(-1, keepdim=True).clamp_min(1e-6)


def sample_statistics(model: nn.Module, targets: Targets, inputs: Tensor, labels: Tensor,
                      ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """For a batch: each target layer's input activations ``[B, in]``, output pre-activations
    ``[B, out]`` and per-sample loss gradients w.r.t. its weight ``[B, out, in]``.

    The gradient of one sample's loss w.r.t. ``W`` is ``delta_o * a_i`` (delta = gradient w.r.t. the
    layer's output), so it is formed as an outer product instead of B backward passes.
    """
    x, acts, outs = inputs, [], []
    with torch.enable_grad():
        for module in targets.suffix:
            if isinstance(module, nn.Linear) and len(acts) < len(targets.shapes):
                acts.append(x.detach())
                # the first output is a leaf so the backward pass stops there (the prefix is frozen)
                x = module(x.detach()).detach().requires_grad_() if len(acts) == 1 else module(x)
                outs.append(x)
            else:
                x = module(x)
        loss = F.cross_entropy(x, labels, reduction="sum")  # a sum keeps each sample's own gradient
        deltas = torch.autograd.grad(loss, outs)
    grads = [d[:, :, None] * a[:, None, :] for d, a in zip(deltas, acts, strict=True)]
    return acts, [o.detach() for o in outs], grads


def node_features(model: nn.Module, targets: Targets, graph: ParameterGraph, inputs: Tensor,
                  labels: Tensor) -> Tensor:
    """``[B, nodes, 5]`` node features for a batch of samples.

    Weight node ``(o, i)``: input activation ``a_i``, the output neuron's pre-activation ``z_o`` (its
    value before the ReLU; the paper's "activation", which after a ReLU would be 0 for every weight of
    an inactive neuron and tell them apart no more), weight ``W_oi``,
    gradient of the sample's loss ``dL/dW_oi``, and 0; each column standardised over the layer's
    weights, per sample. Neuron node: its (standardised) activation in the first two columns,
    zeros, and a 1 in the last column, so the GCN can tell the two kinds apart.
    """
    acts, outs, grads = sample_statistics(model, targets, inputs, labels)
    weights = _target_weights(model, targets)
    batch = inputs.shape[0]
    weight_blocks = []
    for a, z, g, w in zip(acts, outs, grads, weights, strict=True):
        o, i = w.shape
        columns = [a[:, None, :].expand(batch, o, i), z[:, :, None].expand(batch, o, i),
                   w.expand(batch, o, i), g]
        weight_blocks.append(torch.stack([_standardise(c.reshape(batch, -1)) for c in columns]
                                         + [torch.zeros(batch, o * i, device=inputs.device)], dim=-1))
    neuron_acts = [acts[0]] + outs
    neuron_blocks = [torch.stack([_standardise(v)] * 2 + [torch.zeros_like(v)] * 2 + [torch.ones_like(v)], dim=-1)
                     for v in neuron_acts]
    features = torch.cat(weight_blocks + neuron_blocks, dim=1)
    if features.shape[1] != graph.n_nodes:
        raise ValueError(f"the graph has {graph.n_nodes} nodes but these target layers give {features.shape[1]}; "
                         "build the graph from the same targets (build_parameter_graph(targets.shapes))")
    return features


def saliency(model: nn.Module, targets: Targets, inputs: Tensor, labels: Tensor) -> Tensor:
    """``[B, N]`` per-sample saliency ``|w * dL/dw|`` of every target weight (no GCN involved)."""
    _, _, grads = sample_statistics(model, targets, inputs, labels)
    weights = _target_weights(model, targets)
    return torch.cat([(w * g).abs().flatten(1) for w, g in zip(weights, grads, strict=True)], dim=1)


# --------------------------------------------------------------------------------------------
# The control unit and the mask sampler
# --------------------------------------------------------------------------------------------


class ControlUnit(nn.Module):
    """A GCN over the parameter graph giving one logit per weight.

    An MLP embeds each node's features, ``rounds`` GCN layers (residual, ReLU) pass messages
    along weight-neuron edges (two rounds let a weight hear from every weight that shares a
    neuron with it), and a linear read-out gives the weight nodes' logits.

    The GCN layers are torch-geometric ``GCNConv`` modules; a batch of samples is propagated
    with one sparse matrix product (:meth:`ParameterGraph.propagate`), which computes exactly
    ``GCNConv(h, norm_edge_index, norm_edge_weight)`` for every sample at once, several times
    faster than message passing over a ``[B, nodes, H]`` tensor on a CPU.

    The width defaults to 16, below the 32 to 64 of the design notes: on quick mode's MLP (seeds 0
    and 1, 2026-11-23, one CPU thread) widths 32 and 64 cost 2 and 4.5 times the control unit's
    training time and 2 to 4 times a request's, with no consistent gain (final masked NLL 0.098,
    0.170, 0.083 at seed 0 and 0.064, 0.043, 0.028 at seed 1; forget and test accuracy after the
    request within 3 points of each other).
    """

    def __init__(self, hidden: int = 16, rounds: int = 2, n_features: int = N_FEATURES):
        super().__init__()
        if hidden < 1 or rounds < 1:
            raise ValueError(f"need hidden >= 1 and rounds >= 1, got hidden={hidden}, rounds={rounds}")
        self.config = {"hidden": hidden, "rounds": rounds, "n_features": n_features}
        self.embed = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.convs = nn.ModuleList(GCNConv(hidden, hidden, normalize=False) for _ in range(rounds))
        self.readout = nn.Linear(hidden, 1)

    def forward(self, features: Tensor, graph: ParameterGraph) -> Tensor:
        """``[B, nodes, F]`` features to ``[B, N]`` logits of the weight nodes."""
        h = self.embed(features)
        for conv in self.convs:
            h = h + torch.relu(graph.propagate(conv.lin(h)) + conv.bias)
        return self.readout(h[:, :graph.n_weights]).squeeze(-1)


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """``[..., N]`` float 0/1 mask with ones at the ``k`` largest scores of each row."""
    return torch.zeros_like(scores).scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)


def gumbel_topk(logits: Tensor, k: int, temperature: float = 0.5, generator: torch.Generator | None = None,
                noise: bool = True) -> Tensor:
    """A relaxed top-k sample: exactly ``k`` ones per row in the forward pass, the gradient of a
    soft mask in the backward pass (straight-through).

    Gumbel noise added to the logits makes the top-k a sample from a Plackett-Luce distribution;
    the soft mask is ``sigmoid((perturbed - t) / temperature)`` with ``t`` halfway between the
    k-th and (k+1)-th perturbed logit.
    """
    if not 0 < k < logits.shape[-1]:
        raise ValueError(f"k={k} must be between 1 and N-1={logits.shape[-1] - 1}")
    perturbed = logits
    if noise:
        u = torch.rand(logits.shape, generator=generator).to(logits.device).clamp(1e-10, 1 - 1e-10)
        perturbed = logits - torch.log(-torch.log(u))
    top = perturbed.detach().topk(k + 1, dim=-1).values
    threshold = 0.5 * (top[..., k - 1:k] + top[..., k:k + 1])
    soft = torch.sigmoid((perturbed - threshold) / temperature)
    hard = topk_mask(perturbed.detach(), k)
    return hard + (soft - soft.detach())  # exactly 0/1 forward: the bracket is exactly zero


def mean_field_log_q(logits: Tensor, k: int) -> Tensor:
    """``E_Q[log Q(m)]`` per row under the mean-field approximation ``Q ~ prod Bernoulli(q_w)``,
    with ``q = sigmoid(logit - t)`` and ``t`` between the k-th and (k+1)-th logit (so about k
    weights are on). The exact log-probability of a Gumbel top-k set is intractable."""
    top = logits.detach().topk(k + 1, dim=-1).values
    q = torch.sigmoid(logits - 0.5 * (top[..., k - 1:k] + top[..., k:k + 1])).clamp(1e-6, 1 - 1e-6)
    return (q * q.log() + (1 - q) * (1 - q).log()).sum(-1)


# --------------------------------------------------------------------------------------------
# The controller: control unit + graph + targets, trained on training samples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceBank:
    """Masks of retained samples ("what everyone else needs"), kept between requests so that a
    request pays only for its own forget masks. Make one with :meth:`Controller.bank`.

    It remembers which samples the masks belong to because a sample that is forgotten must leave
    the bank (:meth:`without`): its mask would otherwise keep shaping later requests, and would
    count as "needed by others" the very weights that request should switch off.

    Attributes:
        indices: dataset indices of the samples.
        masks: their ``[n, N]`` bool masks, one row per index.
        ranking: the masks' kind (``"learned"`` or ``"saliency"``); a request must rank the same way.
    """

    indices: Tensor
    masks: Tensor
    ranking: str

    def __post_init__(self):
        if self.masks.dim() != 2 or len(self.masks) != len(self.indices):
            raise ValueError(f"a bank needs one mask row per sample: {len(self.indices)} indices, masks of "
                             f"shape {tuple(self.masks.shape)}")

    def __len__(self) -> int:
        return len(self.indices)

    def without(self, forgotten: Tensor) -> ReferenceBank:
        """The bank less the samples in ``forgotten`` (e.g. a split's ``forget``: all forgotten so far)."""
        kept = ~torch.isin(self.indices, torch.as_tensor(forgotten).to(self.indices.device))
        return ReferenceBank(self.indices[kept], self.masks[kept], self.ranking)


@dataclass
class Controller:
    """A trained control unit bound to one model's target layers.

    Attributes:
        model: the (never modified) model the masks apply to.
        targets: its target layers.
        graph: the parameter graph over them.
        unit: the GCN.
        delta: the share of target weights each sample's mask keeps.
        config: how it was trained (saved with it).
        history: training loss terms per step (``nll``, ``prior``, ``log_q``, ``loss``).
        seconds: training time, the one-off cost not part of any request: the forward pass that computes the
            target layers' inputs for the training samples, and the optimisation.
    """

    model: nn.Module
    targets: Targets
    graph: ParameterGraph
    unit: ControlUnit
    delta: float
    config: dict = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def k(self) -> int:
        """Weights kept by each mask: ``round(delta * N)``."""
        return max(1, min(self.targets.n_weights - 1, round(self.delta * self.targets.n_weights)))

    def logits(self, inputs: Tensor, labels: Tensor) -> Tensor:
        """``[B, N]`` control-unit logits for samples given by their first-target-layer inputs."""
        return self.unit(node_features(self.model, self.targets, self.graph, inputs, labels), self.graph)

    @torch.no_grad()
    def masks(self, data: ImageDataset, indices: Tensor, ranking: str = "learned", batch_size: int = 256,
              seed: int = 0) -> Tensor:
        """``[n, N]`` bool masks of the weights each sample keeps (``k`` per sample, deterministic
        top-k of the logits). ``ranking="saliency"`` uses top-k ``|w * grad|`` instead (the no-GCN
        baseline) and ``"random"`` k random weights per sample."""
        if ranking not in RANKINGS:
            raise ValueError(f"ranking={ranking!r}; choose one of {RANKINGS}")
        indices = torch.as_tensor(indices).to(data.device)
        inputs = prefix_inputs(self.model, self.targets, data, indices)
        labels = data.labels[indices]
        if ranking == "random":
            generator = torch.Generator().manual_seed(seed)
            scores = torch.rand(len(indices), self.targets.n_weights, generator=generator).to(data.device)
            return topk_mask(scores, self.k).bool()
        out = []
        self.unit.eval()
        for s in range(0, len(indices), batch_size):
            x, y = inputs[s:s + batch_size], labels[s:s + batch_size]
            scores = self.logits(x, y) if ranking == "learned" else saliency(self.model, self.targets, x, y)
            out.append(topk_mask(scores, self.k).bool())
        return torch.cat(out) if out else torch.zeros(0, self.targets.n_weights, dtype=torch.bool,
                                                      device=data.device)

    def bank(self, data: ImageDataset, indices: Tensor, ranking: str = "learned") -> ReferenceBank:
        """The masks of retained samples, computed once and kept between requests: see
        :class:`ReferenceBank`."""
        indices = torch.as_tensor(indices).to(data.device)
        return ReferenceBank(indices, self.masks(data, indices, ranking), ranking)

    def save(self, path: str | Path) -> None:
        """Save the control unit, its settings and a fingerprint of the target weights (atomic write)."""
        save_checkpoint(path, {"state_dict": self.unit.state_dict(), "unit": self.unit.config,
                               "delta": self.delta, "layers": len(self.targets.names),
                               "fingerprint": model_fingerprint(self.model, self.targets),
                               "config": self.config, "history": self.history, "seconds": self.seconds})


def model_fingerprint(model: nn.Module, targets: Targets) -> str:
    """A hash of the target weights: a control unit is only valid for the weights it was trained on."""
    digest = hashlib.sha256()
    for w in _target_weights(model, targets):
        digest.update(w.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


def load_controller(path: str | Path, model: nn.Module) -> Controller:
    """Load a control unit saved by :meth:`Controller.save` for ``model`` (``weights_only=True``).

    Raises:
        ValueError: if it was trained for other weights (the fingerprint differs).
    """
    device = next(model.parameters()).device
    saved = load_checkpoint(path, device)
    targets = find_targets(model, int(saved["layers"]))
    if saved["fingerprint"] != model_fingerprint(model, targets):
        raise ValueError(f"{path} holds a control unit trained for different weights; train one for this model "
                         "with train_controller(model, data, indices)")
    unit = ControlUnit(**saved["unit"]).to(device)
    unit.load_state_dict(saved["state_dict"])
    unit.eval()
    return Controller(model, targets, build_parameter_graph(targets.shapes, device), unit, float(saved["delta"]),
                      dict(saved["config"]), dict(saved["history"]), float(saved["seconds"]))


def importance_prior(model: nn.Module, targets: Targets, inputs: Tensor, labels: Tensor, kind: str) -> Tensor:
    """``log P(w kept | theta)`` per weight, ``[B, N]`` or ``[1, N]``, up to a constant: the log of
    ``|w|`` (``"weight"``) or of the sample's saliency ``|w * g|`` (``"saliency"``), centred."""
    if kind == "weight":
        score = torch.cat([w.abs().flatten() for w in _target_weights(model, targets)])[None]
    elif kind == "saliency":
        score = saliency(model, targets, inputs, labels)
    else:
        raise ValueError(f"prior={kind!r}; use 'weight' (|w|) or 'saliency' (|w * grad|)")
    log_pi = (score + 1e-12).log()
    # log(score / sum) shifted by a constant: every mask keeps exactly k weights, so a constant per
    # weight only shifts the objective, while left in it would dominate the straight-through gradient
    return log_pi - log_pi.mean(-1, keepdim=True)


def train_controller(model: nn.Module, data: ImageDataset, indices: Tensor, *, layers: int = 1,
                     delta: float = 0.1, hidden: int = 16, rounds: int = 2, steps: int = 150,
                     batch_size: int = 32, lr: float = 3e-3, prior: str = "weight", prior_weight: float = 1.0,
                     temperature: float = 0.5, seed: int = 0, progress: bool = True) -> Controller:
    """Train a control unit on training samples ``data[indices]``.

    Each step draws ``batch_size`` samples, a Gumbel top-k mask per sample from the GCN's logits,
    and minimises the per-sample objective (a KL divergence from ``Q_phi`` to the posterior
    ``p(m | x, y) ~ p(y | x; m*W) P(m | W)``, up to a constant)::

        -log p(y | x; m*W)  +  prior_weight / k * ( -log P(m | W)  +  log Q_phi(m) )

    The likelihood is evaluated with the mask applied functionally, so its gradient reaches the
    GCN through the straight-through mask. ``log P(m | W) = sum_{w kept} log pi_w`` with
    ``pi ~ |w|`` or ``|w * g|``; ``log Q`` uses the mean-field approximation
    (:func:`mean_field_log_q`). Dividing the two mask terms by ``k`` puts them on the scale of one
    sample's likelihood; ``prior_weight`` then trades fit against the prior (0 = likelihood only).

    Args:
        layers: target the last 1 (the head) or 2 linear layers.
        delta: share of target weights each mask keeps, in (0, 1).
        hidden, rounds: GCN width and message-passing rounds.
        steps, batch_size, lr: Adam optimisation of the GCN.
        prior: ``"weight"`` or ``"saliency"``.
        temperature: of the relaxed top-k's backward pass.

    Returns:
        A :class:`Controller`; ``seconds`` is this one-off training time.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta}: the share of weights a mask keeps must be in (0, 1), e.g. 0.1")
    if steps < 1 or batch_size < 1 or lr <= 0 or temperature <= 0 or prior_weight < 0:
        raise ValueError("need steps >= 1, batch_size >= 1, lr > 0, temperature > 0 and prior_weight >= 0")
    indices = torch.as_tensor(indices).to(data.device)
    if len(indices) == 0:
        raise ValueError("no training samples given: pass split.train (or a sample of it) as indices")
    device = data.device
    targets = find_targets(model, layers)
    graph = build_parameter_graph(targets.shapes, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unit = ControlUnit(hidden, rounds).to(device)
    config = {"layers": layers, "delta": delta, "hidden": hidden, "rounds": rounds, "steps": steps,
              "batch_size": batch_size, "lr": lr, "prior": prior, "prior_weight": prior_weight,
              "temperature": temperature, "seed": seed, "n_train": len(indices)}
    controller = Controller(model, targets, graph, unit, delta, config, {"nll": [], "prior": [], "log_q": [],
                                                                         "loss": []})
    k = controller.k
    labels = data.labels[indices]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(unit.parameters(), lr=lr)
    unit.train()
    with Stopwatch(device) as watch:
        # part of the one-off cost: the frozen layers' outputs for every training sample, a forward pass
        # over the training set (18.7 of 19.3 s with full mode's CNN on two CPU cores)
        inputs = prefix_inputs(model, targets, data, indices)
        for _ in tqdm(range(steps), desc="control unit", leave=False, disable=not progress, mininterval=1.0):
            batch = torch.randint(len(indices), (batch_size,), generator=generator).to(device)
            x, y = inputs[batch], labels[batch]
            logits = controller.logits(x, y)
            mask = gumbel_topk(logits, k, temperature, generator)
            nll = F.cross_entropy(per_sample_masked_logits(model, targets, x, mask), y, reduction="none")
            log_prior = (mask * importance_prior(model, targets, x, y, prior)).sum(-1)
            log_q = mean_field_log_q(logits, k)
            loss = (nll + prior_weight / k * (log_q - log_prior)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for name, value in (("nll", nll), ("prior", log_prior), ("log_q", log_q), ("loss", loss)):
                controller.history[name].append(value.detach().mean().item())
    unit.eval()
    controller.seconds = watch.seconds
    return controller


# --------------------------------------------------------------------------------------------
# Overlap, exclusivity, and the forgetting plan
# --------------------------------------------------------------------------------------------


def overlap_scores(masks: Tensor, reference: Tensor, exclude_self: bool = False) -> Tensor:
    """``c(m_i) = sum_j m_i . m_j`` over the reference masks, divided by ``k * len(reference)``
    so it reads as "the share of its kept weights an average reference sample also keeps".

    Low = the sample's prediction rests on weights few others use (easy to forget).
    ``exclude_self=True`` when ``masks`` and ``reference`` are the same set (drops ``j = i``).
    """
    if masks.shape[-1] != reference.shape[-1]:
        raise ValueError(f"masks over {masks.shape[-1]} weights vs reference over {reference.shape[-1]}")
    m, r = masks.float(), reference.float()
    shared = m @ r.sum(0)
    count = len(r)
    if exclude_self:
        if masks.shape != reference.shape:
            raise ValueError("exclude_self=True needs masks and reference to be the same set")
        shared = shared - (m * m).sum(1)
        count -= 1
    k = m.sum(1).clamp_min(1)
    return shared / (k * max(count, 1))


def exclusivity(forget_masks: Tensor, retain_masks: Tensor) -> Tensor:
    """``e_w = mean_f m_f[w] - mean_r m_r[w]``: how much more the forget samples rely on weight w."""
    if len(forget_masks) == 0 or len(retain_masks) == 0:
        raise ValueError("exclusivity needs at least one forget mask and one retain mask")
    return forget_masks.float().mean(0) - retain_masks.float().mean(0)


@dataclass
class ForgetPlan:
    """Which weights a request switches off, and what the scan saw.

    Attributes:
        off: ``[N]`` bool, the weights to switch off.
        order: the ranking scanned (most exclusive first).
        n_off: how many were switched off.
        reached: whether the confidence fell below the threshold within the budget.
        threshold: the target mean confidence.
        curve: ``(n_off, mean forget confidence)`` after each chunk (the first entry: nothing off).
    """

    off: Tensor
    order: Tensor
    n_off: int
    reached: bool
    threshold: float
    curve: list[tuple[int, float]]


@torch.no_grad()
def plan_forgetting(model: nn.Module, targets: Targets, inputs: Tensor, labels: Tensor, order: Tensor,
                    threshold: float, *, chunk: int = 8, budget: float = 0.25, keep: Tensor | None = None,
                    ) -> ForgetPlan:
    """Switch weights off in ``order``, ``chunk`` at a time, until the mean confidence ``p(y|x)`` of
    the forget samples (given by their first-target-layer ``inputs``) is below ``threshold``, or
    ``budget * N`` weights are off. ``keep`` is the mask of earlier requests (composition)."""
    n = targets.n_weights
    if chunk < 1 or not 0 < budget <= 1:
        raise ValueError(f"need chunk >= 1 and 0 < budget <= 1, got chunk={chunk}, budget={budget}")
    base = torch.ones(n, device=inputs.device) if keep is None else keep.float()
    limit = max(1, int(budget * n))
    order = order[base[order] > 0]  # weights already off for an earlier request cannot help again
    off = torch.zeros(n, dtype=torch.bool, device=inputs.device)
    confidence = true_class_confidence(suffix_logits(model, targets, inputs, base), labels).mean().item()
    curve, count = [(0, confidence)], 0
    while confidence >= threshold and count < min(limit, len(order)):
        count = min(count + chunk, limit, len(order))
        off[order[:count]] = True
        confidence = true_class_confidence(suffix_logits(model, targets, inputs, base * ~off), labels).mean().item()
        curve.append((count, confidence))
    return ForgetPlan(off, order, count, confidence < threshold, threshold, curve)


def ranking_order(controller: Controller, data: ImageDataset, forget: Tensor, reference: Tensor | None,
                  ranking: str = "learned", seed: int = 0, reference_masks: Tensor | None = None,
                  mask_samples: int | None = 256) -> Tensor:
    """The order in which a request switches weights off: descending exclusivity of the forget
    masks against the reference (retain) masks, with masks from the GCN (``"learned"``) or from
    top-k saliency (``"saliency"``); ``"random"`` is a random permutation (the control).

    ``mask_samples`` caps how many forget samples' masks estimate the forget side of the
    exclusivity (a mean over a random subset; ``None`` = all): the GCN pass is the cost of a
    request, and a mean over a few hundred masks is already close to the mean over all."""
    n = controller.targets.n_weights
    generator = torch.Generator().manual_seed(seed)
    if ranking == "random":
        return torch.randperm(n, generator=generator).to(data.device)
    if reference_masks is None:
        if reference is None:
            raise ValueError("give reference (retain indices) or reference_masks")
        reference_masks = controller.masks(data, reference, ranking)
    forget = torch.as_tensor(forget)
    if mask_samples is not None and len(forget) > mask_samples:
        forget = forget[torch.randperm(len(forget), generator=generator)[:mask_samples].to(forget.device)]
    scores = exclusivity(controller.masks(data, forget, ranking), reference_masks)
    return scores.sort(descending=True, stable=True).indices


# --------------------------------------------------------------------------------------------
# The masked view of a model
# --------------------------------------------------------------------------------------------


class MaskedModel(nn.Module):
    """A model whose target weights are multiplied by 0/1 masks at inference, never written.

    Each forget request is a named ``[N]`` bool mask of weights switched off; a weight is used
    when no active request switches it off. With no request active the forward pass *is* the
    original model's, so revoking every request restores its outputs bit for bit.

    It deliberately has no ``head`` or ``features``: classifier-level code reading
    ``model.head`` would see the unmasked weights, so such code gets a clear error instead.
    """

    def __init__(self, model: nn.Module, targets: Targets, requests: dict[str, Tensor] | None = None):
        super().__init__()
        self.base = model
        self.targets = targets
        self.requests: dict[str, Tensor] = dict(requests or {})
        # A new module starts in training mode, and code that puts a model back in the mode it found it in
        # (``model.train(was_training)``) would then switch the base's batch norm to batch statistics and
        # let every forward pass rewrite its running statistics: the view takes the base's mode instead.
        self.training = model.training

    def keep(self) -> Tensor | None:
        """The ``[N]`` float mask in use (``None`` when no request is active)."""
        if not self.requests:
            return None
        off = torch.stack(list(self.requests.values())).any(0)
        return (~off).float()

    def n_off(self) -> int:
        """How many target weights are switched off now."""
        keep = self.keep()
        return 0 if keep is None else int((keep == 0).sum())

    def add_request(self, off: Tensor, name: str | None = None) -> str:
        """Switch off the weights in ``off`` (``[N]`` bool); returns the request's name."""
        off = torch.as_tensor(off)
        if off.dtype != torch.bool or off.shape != (self.targets.n_weights,):
            raise ValueError(f"off must be a bool tensor of shape [{self.targets.n_weights}], got "
                             f"{off.dtype} {tuple(off.shape)}")
        if name is None:
            number = len(self.requests) + 1
            while f"request-{number}" in self.requests:  # a revoked request leaves a gap in the numbers
                number += 1
            name = f"request-{number}"
        if name in self.requests:
            raise ValueError(f"a request named {name!r} is already active; pick another name or revoke it first")
        self.requests[name] = off.to(next(self.base.parameters()).device)
        return name

    def revoke(self, name: str) -> None:
        """Undo one request: its weights come back unless another active request switches them off."""
        if name not in self.requests:
            raise KeyError(f"no active request {name!r}; active: {list(self.requests)}")
        del self.requests[name]

    def copy(self) -> MaskedModel:
        """Another view of the same base model with the same requests (the base is shared, not copied)."""
        return MaskedModel(self.base, self.targets, self.requests)

    def forward(self, x: Tensor) -> Tensor:
        keep = self.keep()
        if keep is None:
            return self.base(x)
        params = dict(self.base.named_parameters())
        masked = {name: params[name] * m for name, m in zip(self.targets.names, self.targets.split_flat(keep),
                                                             strict=True)}
        return functional_call(self.base, masked, (x,))


# --------------------------------------------------------------------------------------------
# The registered method
# --------------------------------------------------------------------------------------------


def default_threshold(model: nn.Module, data: ImageDataset, split: Split) -> float:
    """The target mean confidence of a request: chance (``1/C``) for a whole class, else the
    original model's mean confidence on the test set (forgotten samples should look unseen)."""
    if split.meta.get("forget_class") is not None:
        return 1.0 / data.num_classes
    return confidences(model, data, split.test).mean().item()


def _check_bank(bank: ReferenceBank, split: Split, ranking: str) -> None:
    """A bank must hold retained samples only, with masks of the ranking the request uses."""
    if ranking == "random":
        raise ValueError("ranking='random' uses no reference masks; drop reference_bank")
    if bank.ranking != ranking:
        raise ValueError(f"the reference bank holds {bank.ranking!r} masks but ranking={ranking!r}; "
                         f"make the bank with controller.bank(data, indices, {ranking!r})")
    if len(bank) == 0:
        raise ValueError("the reference bank is empty: every sample in it has been forgotten; make a new one "
                         "from split.retain")
    indices = bank.indices.cpu()
    not_retained = ~torch.isin(indices, split.retain.cpu())
    if not_retained.any():
        forgotten = int(torch.isin(indices, split.forget.cpu()).sum())
        raise ValueError(f"{int(not_retained.sum())} of the reference bank's {len(bank)} samples are not in "
                         f"split.retain ({forgotten} in this request's forget set, the rest forgotten earlier or "
                         f"never trained on); a bank holds retained samples only: pass "
                         f"bank.without(forgotten_so_far)")


@register("mimu")
def mimu(model: nn.Module, data: ImageDataset, split: Split, *, controller: Controller | None = None,
         threshold: float | None = None, chunk: int = 8, budget: float = 0.25, ranking: str = "learned",
         reference_size: int | None = None, reference_bank: ReferenceBank | None = None,
         mask_samples: int | None = 256,
         seed: int = 0, progress: bool = True, **train_options: Any) -> UnlearningResult:
    """Forget ``split.request`` by switching off the target weights its samples rely on exclusively.

    Args:
        model: a course model, or a :class:`MaskedModel` from an earlier request (the new request
            is composed with the old ones in a new view; the input is not changed).
        controller: a trained :class:`Controller` for this model; trained here (with
            ``train_options`` passed to :func:`train_controller`, on ``split.train``) when ``None``.
            Its training time is reported in ``details["controller_seconds"]``, not in ``seconds``.
        threshold: stop once the forget samples' mean ``p(y|x)`` is below this; default
            :func:`default_threshold`.
        chunk: weights switched off per step of the scan.
        budget: at most this share of target weights is switched off.
        ranking: ``"learned"`` (MIMU), ``"saliency"`` or ``"random"`` (the baselines).
        reference_size: retain samples whose masks stand for "what everyone else needs" (default 500);
            not with ``reference_bank``, whose samples play that part.
        reference_bank: precomputed reference masks (a service keeps them between requests; then
            their cost is not in ``seconds``), e.g. ``controller.bank(data, retain_sample)``. Its
            samples must all be retained: drop forgotten ones with ``bank.without(split.forget)``.
        mask_samples: forget samples whose masks estimate the exclusivity (``None`` = all); the
            confidence target is always checked on every forget sample.

    Returns:
        An :class:`UnlearningResult` whose model is a :class:`MaskedModel`; ``details`` has the
        request name, ``n_off``, ``share_off``, ``reached``, ``threshold`` and the scan ``curve``.
    """
    base, previous = (model.base, model) if isinstance(model, MaskedModel) else (model, None)
    if not isinstance(base, Classifier):
        raise TypeError(f"mimu needs a unlearnkit Classifier (or a MaskedModel of one), got {type(base).__name__}")
    check_call(base, data, split)
    if ranking not in RANKINGS:
        raise ValueError(f"ranking={ranking!r}; choose one of {RANKINGS}")
    if threshold is not None and not 0 < threshold < 1:
        raise ValueError(f"threshold={threshold}: a confidence target must be in (0, 1)")
    if reference_size is not None and reference_bank is not None:
        raise ValueError("give reference_size or reference_bank, not both: the bank's samples are the reference")
    reference_size = 500 if reference_size is None else reference_size
    if reference_size < 1 or (mask_samples is not None and mask_samples < 1):
        raise ValueError(f"reference_size={reference_size} and mask_samples={mask_samples} must be >= 1 (a number "
                         "of samples; mask_samples=None uses every forget sample)")
    controller_options = [*inspect.signature(train_controller).parameters][3:]  # after model, data, indices
    unknown = sorted(set(train_options) - set(controller_options))
    if unknown:
        raise TypeError(f"mimu got unknown keyword arguments {unknown}; besides its own it takes train_controller's "
                        f"options {controller_options}")
    controller_seconds = 0.0
    if controller is None:
        controller = train_controller(base, data, split.train, seed=seed, progress=progress, **train_options)
        controller_seconds = controller.seconds
    elif train_options:
        raise TypeError(f"training options {sorted(train_options)} given with a trained controller; drop them")
    if controller.model is not base:
        raise ValueError("the controller was trained for another model; train or load one for this model")
    if reference_bank is not None:
        _check_bank(reference_bank, split, ranking)
    threshold = default_threshold(base, data, split) if threshold is None else threshold
    generator = torch.Generator().manual_seed(seed)
    reference = split.retain[torch.randperm(len(split.retain), generator=generator)[:reference_size]]
    request = split.request.to(data.device)
    masked = previous.copy() if previous is not None else MaskedModel(base, controller.targets)
    with Stopwatch(data.device) as watch:
        order = ranking_order(controller, data, request, reference, ranking, seed,
                              None if reference_bank is None else reference_bank.masks, mask_samples)
        inputs = prefix_inputs(base, controller.targets, data, request)
        plan = plan_forgetting(base, controller.targets, inputs, data.labels[request], order, threshold,
                               chunk=chunk, budget=budget, keep=masked.keep())
        name = masked.add_request(plan.off)
    details = {"request": name, "n_off": plan.n_off, "share_off": plan.n_off / controller.targets.n_weights,
               "reached": plan.reached, "threshold": threshold, "curve": plan.curve, "ranking": ranking,
               "controller_seconds": controller_seconds, "forgotten": len(request)}
    return UnlearningResult(masked, watch.seconds, "mimu", details)


__all__ = ["Controller", "ControlUnit", "ForgetPlan", "MaskedModel", "ParameterGraph", "ReferenceBank", "Targets",
           "build_parameter_graph", "default_threshold", "exclusivity", "find_targets", "gumbel_topk",
           "importance_prior", "load_controller", "mean_field_log_q", "mimu", "model_fingerprint",
           "node_features", "overlap_scores", "per_sample_masked_logits", "plan_forgetting", "prefix_inputs",
           "ranking_order", "saliency", "sample_statistics", "suffix_logits", "topk_mask", "train_controller"]
