"""ModelRunner: drives the layers of a Hugging Face causal LM (plain or recursive) for the serving engine.

One engine step is one LOOP: `columns[c]` is the c-th layer call of a step, and a row at loop b in that
call runs unrolled position `slot_table[b, c]` with LoRA/norm depth `depth_table[b, c]`:

    plain model (N layers):        1 loop  x N columns, slot = column
    recursive, CYCLE (B loops, K): B loops x K columns, slot = b * K + c, depth = b   (exits between loops)
    recursive, SEQUENCE:           1 loop  x N columns (each layer repeats B times in a row: no loop boundary)

The decoder layers are the Hugging Face modules themselves (norms, projections, rotary, MLP); only the
attention over the cache is the engine's (`rrt_ray.serve.kv_cache.engine_attention`).

Weights (`weights=`): "lora" runs each relaxed projection as W'x + B_b A_b x (the multi-LoRA kernels);
"merged" precomputes W'_b = W' + s B_b A_b for every depth b (exact, `RelaxedLoRALinear.merged_weight`)
and runs one dense matmul per depth run of rows, so a full-depth recursive step does the original
model's arithmetic, at the cost of B dense copies of every relaxed projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from rrt_ray.kernels.segments import depth_runs
from rrt_ray.models import RecursiveForCausalLM, UnrolledPosition
from rrt_ray.models.arch import ARCHITECTURES, arch_spec
from rrt_ray.models.layer_map import SHARING_MODES
from rrt_ray.models.lora import RelaxedLoRALinear
from rrt_ray.serve.kv_cache import ATTN_IMPLEMENTATION, StepBatch


@dataclass
class _Column:
    """One layer call of a step: a decoder layer and, for a recursive model, how to point it at a depth."""

    layer: nn.Module
    pre_attn_norm: nn.Module | None
    attention: nn.Module | None
    unrolled: object | None = None  # UnrolledLayers, for set_position
    position: UnrolledPosition | None = None


WEIGHT_MODES: tuple[str, ...] = ("lora", "merged")


def _merged_forward(module: RelaxedLoRALinear, merged: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """RelaxedLoRALinear.forward with per-depth dense weights merged (D, d_out, d_in): one matmul per
    depth run of the rows (the engine orders rows by depth), no LoRA."""
    depth, bias = module.depth, module.bias

    def bias_at(d: int) -> torch.Tensor | None:
        return None if bias is None else (bias if bias.dim() == 1 else bias[d])

    if isinstance(depth, int):
        return F.linear(x, merged[depth], bias_at(depth))
    runs = depth_runs(depth)
    flat = x.reshape(-1, module.in_features)  # (T, d_in)
    if len(runs) > module.num_depths + 1:  # not grouped by depth: per depth with masks
        out = flat.new_empty(flat.shape[0], module.out_features)
        index = depth.reshape(-1).clamp_min(0)
        for d in torch.unique(index).tolist():
            rows = index == d
            out[rows] = F.linear(flat[rows], merged[d], bias_at(d))
        return out.view(*x.shape[:-1], module.out_features)
    pieces = [F.linear(flat[start:end], merged[max(d, 0)], bias_at(max(d, 0))) for d, start, end in runs]
    return torch.cat(pieces).view(*x.shape[:-1], module.out_features)


class ModelRunner:
    """The parts of a Hugging Face causal LM the engine drives, and the forward passes it needs.

    columns[c] is the c-th layer call of one engine step; slot_table[loop, c] / depth_table[loop, c]
    give the KV slot (unrolled position) and the LoRA/norm depth of a row at `loop` in that call.
    """

    def __init__(self, model: nn.Module, weights: str = "lora") -> None:
        if weights not in WEIGHT_MODES:
            raise ValueError(f"unknown weights mode {weights!r}; allowed: {', '.join(WEIGHT_MODES)}")
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        text = model.config.text_config if isinstance(model, RecursiveForCausalLM) else model.config
        self.arch = arch_spec(text.model_type)  # every fact about the family's module layout
        if isinstance(model, RecursiveForCausalLM):
            hf, text = model.backbone, model.config.text_config
            unrolled = model.unrolled_layers
            positions = unrolled.positions
            if SHARING_MODES.get(model.config.sharing).loop_exits:  # loop b runs shared layers 0..K-1
                num_loops, num_shared = model.config.num_loops, model.config.num_shared_layers
                table = [[positions[b * num_shared + k] for k in range(num_shared)] for b in range(num_loops)]
                layers = [unrolled.shared[k] for k in range(num_shared)]
            else:  # SEQUENCE repeats each layer B times in a row: no loop boundary to exit at
                table = [list(positions)]
                layers = [unrolled.shared[p.shared] for p in positions]
            self.columns = [self._column(layer, unrolled, table[0][c]) for c, layer in enumerate(layers)]
            self.slot_table = torch.tensor([[p.position for p in row] for row in table], device=self.device)
            self.depth_table = torch.tensor([[p.depth for p in row] for row in table], device=self.device)
        else:
            hf, text = model, model.config
            inner_layers = self.arch.module(hf, "layers")
            self.columns = [self._column(layer, None, None) for layer in inner_layers]
            self.slot_table = torch.arange(len(self.columns), device=self.device).unsqueeze(0)
            self.depth_table = torch.zeros_like(self.slot_table)
        self.text_config = text
        self.num_loops, self.num_columns = self.slot_table.shape
        self.num_slots = int(self.slot_table.max()) + 1
        self.embed = hf.get_input_embeddings()
        self.head = hf.get_output_embeddings()
        try:
            self.rotary = self.arch.module(hf, "rotary")
            self.final_norm = self.arch.module(hf, "final_norm")
        except ValueError as err:
            raise ValueError(
                f"unsupported architecture {text.model_type!r} for the serving engine ({err}): it needs rotary "
                f"position embeddings, a final norm and an LM head (tested: {ARCHITECTURES.allowed()})"
            ) from None
        if self.head is None:
            raise ValueError(f"unsupported architecture {text.model_type!r} for the serving engine: it has no LM head")
        self.logit_softcap = getattr(text, "final_logit_softcapping", None)
        self.kv_only_fill = True  # False: fill through the whole attention module (the generic path)
        self.weights = weights
        self._depth_rows = self.depth_table.tolist()  # python ints: depth of (loop, column)
        self.merged_bytes = self._merge_weights() if weights == "merged" else 0
        # The engine's attention runs inside the HF layers; plain forwards (generate) fall back to SDPA.
        model.set_attn_implementation(ATTN_IMPLEMENTATION)

    def _merge_weights(self) -> int:
        """Install per-depth merged weights on every relaxed projection with LoRA; returns their bytes."""
        total = 0
        for column in self.columns:
            for module in column.layer.modules():
                if isinstance(module, RelaxedLoRALinear) and module.rank > 0 and "forward" not in module.__dict__:
                    merged = torch.stack([module.merged_weight(d) for d in range(module.num_depths)])  # (D, d_out, d_in)
                    # An instance-level forward: the HF layer holds this very module, and UnrolledLayers sets
                    # its depth before each call, so replacing the module object would cut both links.
                    module.forward = partial(_merged_forward, module, merged)
                    total += merged.numel() * merged.element_size()
        return total

    def weight_bytes(self) -> int:
        """Bytes of every parameter (tied ones once) plus merged per-depth weights."""
        unique = {p.data_ptr(): p.numel() * p.element_size() for p in self.model.parameters()}
        return sum(unique.values()) + self.merged_bytes

    def _column(self, layer: nn.Module, unrolled, position) -> _Column:
        attention = next((m for m in layer.modules() if hasattr(m, "layer_idx")), None)
        return _Column(layer, getattr(layer, self.arch.input_norm, None), attention, unrolled, position)

    def _prepare(self, c: int, loops: torch.Tensor, batch_loops: list[int] | None = None) -> None:
        """Point column c's shared layer at its position, with the rows' depths; batch_loops: the distinct
        loops of the batch when the caller knows them (no device read)."""
        column = self.columns[c]
        if column.unrolled is None:
            return
        if batch_loops is None:
            batch_loops = torch.unique(loops).tolist()
        if len(batch_loops) == 1:  # one loop depth in the whole batch: an int, the two-matmul fast path
            column.unrolled.set_position(column.position, self._depth_rows[batch_loops[0]][c])
            return
        depths = self.depth_table[loops, c]  # (T,)
        column.unrolled.set_position(column.position, depths.unsqueeze(0))

    def run_loop(self, hidden: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """hidden (T, d) after each row's previous loop -> (T, d) after one more loop."""
        h = hidden.unsqueeze(0)  # (1, T, d)
        position_ids = batch.pos.unsqueeze(0)
        position_embeddings = self.rotary(h, position_ids)
        for c, column in enumerate(self.columns):
            batch.column = c
            self._prepare(c, batch.loops, batch.distinct_loops)
            out = column.layer(h, position_embeddings=position_embeddings, position_ids=position_ids, rrt_batch=batch)
            h = out[0] if isinstance(out, tuple) else out
        return h[0]

    def fill_propagate(self, hidden: torch.Tensor, batch: StepBatch) -> None:
        """CALM state propagation: rows' hidden (F, d) produce the keys/values of the loops in batch.loops.

        Each row's exited hidden state goes through the skipped position's own pre-attention norm and
        k/v projections (its depth's LoRA) and rotary. For families whose ArchSpec names kv_projections
        only those run; any other attention module runs whole (q and o wasted) with a
        fill-only batch, which writes its keys/values and skips attention.
        """
        h = hidden.unsqueeze(0)  # (1, F, d)
        position_embeddings = self.rotary(h, batch.pos.unsqueeze(0))
        for c, column in enumerate(self.columns):
            if column.pre_attn_norm is None or column.attention is None:
                raise ValueError("kv_fill='propagate' needs decoder layers with input_layernorm and an attention module")
            batch.column = c
            self._prepare(c, batch.loops, batch.distinct_loops)
            normed = column.pre_attn_norm(h)
            attention = column.attention
            if self.kv_only_fill and self.arch.kv_projections is not None:
                key_proj, value_proj = (getattr(attention, name) for name in self.arch.kv_projections)
                shape = (*normed.shape[:-1], -1, attention.head_dim)
                keys = key_proj(normed).view(shape).transpose(1, 2)  # (1, H_kv, F, hd)
                values = value_proj(normed).view(shape).transpose(1, 2)
                keys = self.arch.rotate_keys(attention, keys, *position_embeddings)
                batch.pool.write(batch.slots(), batch.seqs, batch.pos, keys[0].transpose(0, 1), values[0].transpose(0, 1))
            else:
                attention(hidden_states=normed, attention_mask=None, position_embeddings=position_embeddings, rrt_batch=batch)

    def exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The exit head: final norm + LM head. hidden (U, d) -> fp32 logits (U, V)."""
        logits = self.head(self.final_norm(hidden)).float()
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits
