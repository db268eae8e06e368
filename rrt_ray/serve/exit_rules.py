"""Exit rules that cost less than the LM head: a small learned classifier (CALM's cheap rule).

The confidence rule (max softmax probability of the exit head) needs full-vocabulary logits for every
token it looks at, and most tokens stay: with a large vocabulary that head costs as much as several
decoder layers, paid for nothing. `ExitClassifier` decides from the hidden state itself:

    score_b(h) = sigmoid(w_b . norm(h) + c_b)     norm: the model's final norm; one probe per loop b < B

trained to predict "the exit after loop b picks the same token as full depth" on the model's own hidden
states (held-out text, teacher-forced): d multiply-adds per token instead of V x d. The engine then runs
the head only for the tokens that leave (`EngineConfig(exit_rule="classifier")`; the request's
exit_threshold applies to the score). Fitting needs no gradients through the model: it is a logistic
regression on cached features, seconds on a CPU, so it can follow any early-exit training run.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

EXIT_RULES: tuple[str, ...] = ("confidence", "classifier")
CLASSIFIER_FILE = "exit_classifier.safetensors"


class ExitClassifier(nn.Module):
    """One logistic probe per loop on the final-normed hidden state (U, d) -> P(exit agrees) (U,)."""

    def __init__(self, hidden_size: int, num_loops: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_loops, hidden_size))  # (B, d)
        self.bias = nn.Parameter(torch.zeros(num_loops))  # (B,)

    def forward(self, normed: torch.Tensor, loop: torch.Tensor) -> torch.Tensor:
        """normed (U, d); loop (U,) 0-based loop index of each row -> (U,) probabilities."""
        w = self.weight.to(normed.dtype)[loop]  # (U, d)
        return torch.sigmoid((normed * w).sum(-1) + self.bias.to(normed.dtype)[loop])

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(directory) / CLASSIFIER_FILE
        save_file({"weight": self.weight.detach().cpu().contiguous(), "bias": self.bias.detach().cpu().contiguous()}, str(path))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "ExitClassifier":
        from safetensors.torch import load_file

        path = Path(directory) / CLASSIFIER_FILE
        if not path.is_file():
            raise ValueError(f"no exit classifier at {str(path)!r}: fit one with rrt_ray.serve.exit_rules.fit_exit_classifier")
        tensors = load_file(str(path))
        classifier = cls(tensors["weight"].shape[1], tensors["weight"].shape[0])
        classifier.load_state_dict(tensors)
        return classifier


@torch.no_grad()
def loop_features(model, sequences: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per loop: final-normed hidden states (S*L, d) and whether that exit's argmax equals full depth's."""
    from rrt_ray.models.early_exit import final_norm

    layers = model.unrolled_layers
    layers.loop_outputs = []
    try:
        model.backbone.base_model(input_ids=torch.tensor(sequences, device=next(model.parameters()).device))
        hidden = layers.loop_outputs
    finally:
        layers.loop_outputs = None
    norm, head = final_norm(model), model.get_output_embeddings()
    normed = [norm(h).flatten(0, 1).float() for h in hidden]  # B x (S*L, d)
    argmax = [head(n.to(head.weight.dtype)).argmax(-1) for n in normed]
    return normed, [(a == argmax[-1]).float() for a in argmax]


def fit_exit_classifier(model, sequences: list[list[int]], steps: int = 300, lr: float = 0.05) -> ExitClassifier:
    """Logistic regression of "exit b agrees with full depth" on the model's own features (full batch, Adam)."""
    normed, agree = loop_features(model, sequences)
    classifier = ExitClassifier(normed[0].shape[1], len(normed))
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    features = torch.cat(normed[:-1])  # (N, d): the last loop never needs a decision
    labels = torch.cat(agree[:-1])
    loops = torch.cat([torch.full((n.shape[0],), b) for b, n in enumerate(normed[:-1])])
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            w = classifier.weight[loops]
            logits = (features * w).sum(-1) + classifier.bias[loops]
            F.binary_cross_entropy_with_logits(logits, labels).backward()
            optimizer.step()
    return classifier.eval().requires_grad_(False)
