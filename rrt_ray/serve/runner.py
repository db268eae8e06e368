"""ModelRunner: drives the layers of a Hugging Face causal LM (plain or recursive) for the serving engine.

One engine step is one LOOP: `columns[c]` is the c-th layer call of a step, and a row at loop b in that
call runs unrolled position `slot_table[b, c]` with LoRA/norm depth `depth_table[b, c]`:

    plain model (N layers):        1 loop  x N columns, slot = column
    recursive, CYCLE (B loops, K): B loops x K columns, slot = b * K + c, depth = b   (exits between loops)
    recursive, SEQUENCE:           1 loop  x N columns (each layer repeats B times in a row: no loop boundary)

The decoder layers are the Hugging Face modules themselves (norms, projections, rotary, MLP); only the
attention over the cache is the engine's (`rrt_ray.serve.kv_cache.engine_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from rrt_ray.models import RecursiveForCausalLM, UnrolledPosition
from rrt_ray.models.arch import ARCHITECTURES, arch_spec
from rrt_ray.models.layer_map import SHARING_MODES
from rrt_ray.serve.kv_cache import ATTN_IMPLEMENTATION, StepBatch


@dataclass
class _Column:
    """One layer call of a step: a decoder layer and, for a recursive model, how to point it at a depth."""

    layer: nn.Module
    pre_attn_norm: nn.Module | None
    attention: nn.Module | None
    unrolled: object | None = None  # UnrolledLayers, for set_position
    position: UnrolledPosition | None = None


class ModelRunner:
    """The parts of a Hugging Face causal LM the engine drives, and the forward passes it needs.

    columns[c] is the c-th layer call of one engine step; slot_table[loop, c] / depth_table[loop, c]
    give the KV slot (unrolled position) and the LoRA/norm depth of a row at `loop` in that call.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
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
            self.slot_table = torch.tensor([[p.position for p in row] for row in table])
            self.depth_table = torch.tensor([[p.depth for p in row] for row in table])
        else:
            hf, text = model, model.config
            inner_layers = self.arch.module(hf, "layers")
            self.columns = [self._column(layer, None, None) for layer in inner_layers]
            self.slot_table = torch.arange(len(self.columns)).unsqueeze(0)
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
        # The engine's attention runs inside the HF layers; plain forwards (generate) fall back to SDPA.
        model.set_attn_implementation(ATTN_IMPLEMENTATION)

    def _column(self, layer: nn.Module, unrolled, position) -> _Column:
        attention = next((m for m in layer.modules() if hasattr(m, "layer_idx")), None)
        return _Column(layer, getattr(layer, self.arch.input_norm, None), attention, unrolled, position)

    def _prepare(self, c: int, loops: torch.Tensor) -> None:
        column = self.columns[c]
        if column.unrolled is None:
            return
        depths = self.depth_table[loops, c]  # (T,)
        uniform = bool((depths == depths[0]).all())
        column.unrolled.set_position(column.position, int(depths[0]) if uniform else depths.unsqueeze(0))

    def run_loop(self, hidden: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """hidden (T, d) after each row's previous loop -> (T, d) after one more loop."""
        h = hidden.unsqueeze(0)  # (1, T, d)
        position_ids = batch.pos.unsqueeze(0)
        position_embeddings = self.rotary(h, position_ids)
        for c, column in enumerate(self.columns):
            batch.column = c
            self._prepare(c, batch.loops)
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
            self._prepare(c, batch.loops)
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
