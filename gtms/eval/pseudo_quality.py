"""How much better could GTMS's pseudo labels be? P-hat from one model's P with four W.

For each evaluated sentence the model's own prediction ``P`` is filtered as in training,
``P-hat = TreeFilter(P * W)`` (binarised at ``pseudo.binarize_at`` when the config does), with
four vertex weights ``W``:

- ``box``: the box indicator (the ``tree`` row of Table 2);
- ``gradcam``: the structural forest x this model's GradCAM (the ``forest-gradcam`` row, GTMS);
- ``oracle``: the structural forest x the ground-truth mask in place of GradCAM (every sub-tree
  that touches the object gets 1, the others 0): what a perfect attention map could give;
- ``mask``: W = the ground-truth mask itself (the tree filter's own ceiling).

Each is scored as IoU of ``P-hat > threshold`` against the mask at the output stride, and ``W``
as IoU of ``W > 0.5``. The gap between ``box`` and ``oracle`` bounds what GradCAM can add on
this data with this forest; the gap between ``box`` and ``gradcam`` is what it adds now.
``run.py eval --pseudo-labels`` prints it.
"""

from __future__ import annotations

import numpy as np
import torch

from gtms.eval.metrics import AttentionMeter, SegmentationMeter, aligned_table, intersection_union
from gtms.pseudo.attention_source import AttentionSource, TrainedAttention
from gtms.pseudo.gradcam import attention_from_cam
from gtms.pseudo.pseudo_label import filtered_label, vertex_weights

W_SOURCES = ("box", "gradcam", "oracle", "mask")


def weight_variants(box: torch.Tensor, mask: torch.Tensor, forest: torch.Tensor,
                    attention: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four ``W`` of the module doc, each ``[B, N]`` float32. ``box``, ``mask``: ``{0, 1}``
    ``[B, N]``; ``forest``: sub-tree labels ``[B, N]`` (-1 outside the box); ``attention``:
    GradCAM ``A [B, N]`` in [0, 1]."""
    box, mask = box.float(), mask.float()
    return {"box": box,
            "gradcam": vertex_weights(attention.float(), forest),
            "oracle": vertex_weights(mask * box, forest),
            "mask": mask}


class PseudoLabelMeters:
    """P-hat and W quality per ``W`` source, accumulated over sentences."""

    def __init__(self, attention: AttentionSource | None = None):
        self.pseudo_label = {name: SegmentationMeter() for name in W_SOURCES}
        self.weights = {name: SegmentationMeter() for name in W_SOURCES}
        self.source = attention if attention is not None else TrainedAttention()
        self.attention = AttentionMeter()   # GradCAM's health (fallback, pointing, contrast)

    @torch.no_grad()
    def add_batch(self, model_out, core: torch.nn.Module, batch: dict[str, np.ndarray], *,
                  sigma: float, binarize_at: float, threshold: float) -> None:
        """``model_out``: the model's output on the batch (logits, layer4, sentence);
        ``core``: the model (its attention pool gives GradCAM, unless the meters were given
        another attention source); ``batch``: numpy columns with ``image``, ``tokens``,
        ``ref_id``, ``sent_index``, ``box``, ``mask``, ``parent``, ``order``, ``dist`` and
        ``forest``."""
        n = len(batch["box"])
        device = model_out.logits.device
        tensor = {k: torch.from_numpy(np.array(batch[k])).to(device)  # a writable copy
                  for k in ("box", "mask", "parent", "order", "dist", "forest", "image",
                            "tokens", "ref_id", "sent_index") if k in batch}
        box = tensor["box"].float()
        probs = torch.sigmoid(model_out.logits.detach().float())[:, 0].reshape(n, -1)
        attention, fallback = attention_from_cam(self.source.cams(model_out, tensor, core), box)
        attention = attention.to(device)
        masks = np.asarray(batch["mask"]) > 0.5
        self.attention.add(attention.cpu().numpy(), fallback.cpu().numpy(),
                           np.asarray(batch["box"]), masks)
        variants = weight_variants(box.reshape(n, -1), tensor["mask"].reshape(n, -1),
                                   tensor["forest"].reshape(n, -1), attention.reshape(n, -1))
        for name, weights in variants.items():
            label = filtered_label(probs, weights, box.reshape(n, -1), tensor["parent"],
                                   tensor["order"], tensor["dist"], sigma=sigma,
                                   binarize_at=binarize_at).reshape(masks.shape).cpu().numpy()
            weights = weights.reshape(masks.shape).cpu().numpy()
            for i in range(n):
                self.pseudo_label[name].add(*intersection_union(label[i] > threshold, masks[i]))
                self.weights[name].add(*intersection_union(weights[i] > 0.5, masks[i]))

    def summary(self) -> dict[str, float]:
        """``phat_<source>_mean_iou`` and ``w_<source>_mean_iou`` for each ``W`` source."""
        out = {}
        for name in W_SOURCES:
            if len(self.pseudo_label[name]):
                out[f"phat_{name}_mean_iou"] = self.pseudo_label[name].summary()["mean_iou"]
                out[f"w_{name}_mean_iou"] = self.weights[name].summary()["mean_iou"]
        if len(self.attention):
            out.update(self.attention.summary())
        return out


def format_pseudo_table(results: dict[str, dict]) -> str:
    """Splits x W sources: P-hat mean IoU % (and W's in brackets)."""
    header = ["split", *(f"P-hat, W={name} %" for name in W_SOURCES)]
    rows = [header]
    for split, m in results.items():
        if f"phat_{W_SOURCES[0]}_mean_iou" not in m:
            continue
        rows.append([split] + [f"{100 * m[f'phat_{n}_mean_iou']:.1f} "
                               f"({100 * m[f'w_{n}_mean_iou']:.1f})" for n in W_SOURCES])
    lines = ["pseudo labels from this model's P (mean IoU against the GT mask at stride "
             "4; W's own in brackets): box = the tree row, gradcam = forest x this "
             "model's GradCAM (GTMS), oracle = forest x the GT mask as attention, "
             "mask = W is the GT mask:", *aligned_table(rows)]
    health = [["split", "A fallback %", "A pointing %", "chance %", "A contrast"]]
    for split, m in results.items():
        if "attention_fallback" in m:
            health.append([split, f"{100 * m['attention_fallback']:.1f}",
                           f"{100 * m.get('attention_pointing', float('nan')):.1f}",
                           f"{100 * m.get('attention_pointing_chance', float('nan')):.1f}",
                           f"{m.get('attention_contrast', float('nan')):+.3f}"])
    if len(health) > 1:
        lines += ["", "GradCAM's health: A fell back to the box (map zero in the box), its "
                  "in-box peak on the mask (when not fallen back) against a random in-box "
                  "cell, mean A on the mask minus off it in the box:", *aligned_table(health)]
    return "\n".join(lines)
