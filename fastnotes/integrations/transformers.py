"""Hugging Face transformers adapter: T5-family attention through fastnotes.relpos_attention.

    from fastnotes.integrations.transformers import apply_to_t5
    model = T5ForConditionalGeneration.from_pretrained(...)   # or built from a config
    apply_to_t5(model)                                          # in place; returns the model

Every attention layer of a T5 / MT5 / UMT5 model (T5Model, T5ForConditionalGeneration,
T5EncoderModel, the MT5 and UMT5 equivalents and the other heads built on their stacks) then runs
relpos_attention: the model's own bucket table indexed inside the op (bidirectional buckets in
the encoder, causal buckets in the decoder, UMT5's per-layer tables, T5's sharing of the first
layer's table across the stack), no bias in cross-attention, T5's unscaled logits (scale=1.0),
the padding masks as key_padding_mask, and the decoder's KV cache (Lq = 1 against a growing Lk
during generate). The [1, H, Lq, Lk] position bias and the [B, 1, Lq, Lk] additive mask of
transformers are never built: the model's mask hook returns the 2-D padding mask.

Attention-probability dropout runs inside the fused kernels in training mode (relpos_attention's
dropout_p, at the model's rate unless apply_to_t5(..., attention_dropout=p) sets another; 0.0 turns
it off and leaves the residual and feed-forward dropout of the model as they are). Its mask comes
from fastnotes' hash (seeded from torch's generator), not from torch's dropout, so a patched model
in training mode draws other masks than the unpatched one, with the same distribution.

urpe=True adds a learnable URPE table C [H, num_buckets] to every self-attention layer (the
post-softmax factor of Luo et al. 2022, indexed by the same buckets as the bias), initialised
to 1 so the patched model's outputs equal the original's. One table per layer, not shared like
T5's bias table: the factor multiplies each layer's attention probabilities after the softmax,
so a table shared across layers would force one correction on layers that attend differently;
the cost is H x num_buckets parameters per layer. It is the parameter
``<self-attention module>.urpe_table`` (e.g. ``encoder.block.0.layer.0.SelfAttention.urpe_table``),
so it trains with the model and is in its state_dict / save_pretrained checkpoint; a plain
``from_pretrained`` does not know it (it reports the keys as unexpected and drops them), so load
a URPE checkpoint with ``load_urpe_pretrained``.
"""
try:
    import transformers
except ImportError as error:  # pragma: no cover - exercised without transformers
    raise ImportError("fastnotes.integrations.transformers needs Hugging Face transformers: "
                      "pip install 'fastnotes[hf]'") from error
try:
    from transformers.cache_utils import EncoderDecoderCache
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
except ImportError as error:  # pragma: no cover - transformers 4.x
    raise ImportError(f"fastnotes.integrations.transformers needs transformers >= 5 (found "
                      f"{getattr(transformers, '__version__', '?')}): pip install 'fastnotes[hf]'") from error

import functools
import inspect
import types

import torch

from ..attention import relpos_attention
from ..zlpr import multilabel_ce

__all__ = ["ATTN_IMPLEMENTATION", "ATTN_IMPLEMENTATION_BLOOM", "apply_to_bloom", "apply_to_t5", "apply_zlpr",
           "load_urpe_pretrained", "zlpr_loss"]

ATTN_IMPLEMENTATION = "fastnotes_t5"
_OP = "apply_to_t5"


def _padding_mask(batch_size, q_length, kv_length, attention_mask=None, **_):
    """The mask hook of the patched models: the 2-D bool padding mask of the keys (True = keep),
    or None when nothing is padded; never an [Lq, Lk] tensor (causality is the op's flag)."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].to(torch.bool)
    return None if bool(attention_mask.all()) else attention_mask


def _not_called(module, *args, **kwargs):
    raise RuntimeError(f"{ATTN_IMPLEMENTATION}: this attention implementation only runs inside layers patched by "
                       "fastnotes.integrations.transformers.apply_to_t5")


AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _padding_mask)
AttentionInterface.register(ATTN_IMPLEMENTATION, _not_called)


def _key_mask(mask, batch, lk, op=_OP):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.shape != (batch, lk):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{op}: the patched attention takes a 2-D padding attention_mask [batch={batch}, "
                         f"keys={lk}] (1 = attend); got {shape} (4-D custom masks are not supported)")
    return mask.to(torch.bool)


class _Patched:
    """Mixin put in front of a T5-family attention class; the forward wrappers below translate
    each library's calling convention into _attend."""

    def _attend(self, hidden_states, kv_states, mask, cache, table, kwargs):
        batch, lq = hidden_states.shape[:2]
        heads, dim = self.n_heads, self.key_value_proj_dim
        q = self.q(hidden_states).view(batch, lq, heads, dim).transpose(1, 2)
        cross = kv_states is not None
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        past = int(past)
        current = cache
        reuse = False
        if isinstance(cache, EncoderDecoderCache):
            reuse = cross and bool(cache.is_updated.get(self.layer_idx))
            current = cache.cross_attention_cache if cross else cache.self_attention_cache
        if reuse:
            k, v = current.layers[self.layer_idx].keys, current.layers[self.layer_idx].values
        else:
            source = kv_states if cross else hidden_states
            k = self.k(source).view(batch, -1, heads, dim).transpose(1, 2)
            v = self.v(source).view(batch, -1, heads, dim).transpose(1, 2)
            if cache is not None:
                k, v = current.update(k, v, self.layer_idx, kwargs=kwargs)
                if cross and isinstance(cache, EncoderDecoderCache):
                    cache.is_updated[self.layer_idx] = True
        lk = k.shape[2]
        if not cross and lk != past + lq:
            raise NotImplementedError(f"{_OP}: the self-attention cache must hold exactly the past tokens "
                                      f"(past {past} + new {lq} != {lk} keys); static caches are not supported")
        causal = bool(self.is_decoder and not cross)
        buckets = (self.relative_attention_num_buckets, self.relative_attention_max_distance, not self.is_decoder)
        post = getattr(self, "urpe_table", None) if not cross else None
        if table is None and post is None:
            buckets = None
        out = relpos_attention(q, k, v, causal=causal, scale=1.0, rel_bias=table, rel_buckets=buckets,
                               post_table=post, key_padding_mask=_key_mask(mask, batch, lk),
                               dropout_p=self.dropout if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(batch, lq, heads * dim))

    def _own_table(self):
        return self.relative_attention_bias.weight.t() if self.has_relative_attention_bias else None


def _t5_forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, cache=None,
                past_key_values=None, **kwargs):
    """T5Attention / MT5Attention: the stack shares the first layer's bias through position_bias;
    here position_bias carries that layer's table [H, num_buckets] (None in cross-attention)."""
    cache = past_key_values if cache is None else cache
    if key_value_states is not None:
        table = None
    elif position_bias is None:
        table = self._own_table()
    else:
        table = position_bias
        if not (isinstance(table, torch.Tensor) and table.dim() == 2 and table.shape[0] == self.n_heads):
            raise ValueError(f"{_OP}: position_bias must be the shared bias table [H, num_buckets] that a patched "
                             "first layer passes on; dense [1, H, Lq, Lk] biases are not supported")
    out = self._attend(hidden_states, key_value_states, mask, cache, table, kwargs)
    return out, table, None


def _umt5_forward(self, hidden_states, encoder_hidden_states=None, cache=None, attention_mask=None,
                  past_key_values=None, **kwargs):
    """UMT5Attention: every self-attention layer owns its table."""
    cache = past_key_values if cache is None else cache
    table = None if encoder_hidden_states is not None else self._own_table()
    return self._attend(hidden_states, encoder_hidden_states, attention_mask, cache, table, kwargs), None


_PATCHED_CLASSES = {}


def _attention_classes():
    """{original attention class: forward wrapper} for the families this transformers has."""
    found = {}
    for module, name, forward in (("t5", "T5Attention", _t5_forward), ("mt5", "MT5Attention", _t5_forward),
                                  ("umt5", "UMT5Attention", _umt5_forward)):
        try:
            mod = __import__(f"transformers.models.{module}.modeling_{module}", fromlist=[name])
        except ImportError:  # pragma: no cover - older transformers without the family
            continue
        if hasattr(mod, name):
            found[getattr(mod, name)] = forward
    return found


def _patched_class(cls, forward, mixin=_Patched):
    if cls not in _PATCHED_CLASSES:
        body = {} if forward is None else {"forward": forward}
        _PATCHED_CLASSES[cls] = type(f"Fastnotes{cls.__name__}", (mixin, cls), body)
    return _PATCHED_CLASSES[cls]


def _set_implementation(model, name):
    """Every config in the model (the top one and the sub-models') names our attention, so that the
    models' mask builders call our mask hook."""
    configs = {id(model.config): model.config} if hasattr(model, "config") else {}
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            configs[id(m.config)] = m.config
    for config in configs.values():
        config._attn_implementation = name


def _check_attention_dropout(op, attention_dropout):
    if attention_dropout is not None and (isinstance(attention_dropout, bool) or not isinstance(
            attention_dropout, (int, float)) or not 0 <= attention_dropout < 1):
        raise ValueError(f"{op}: attention_dropout must be None (the model's rate) or a number in [0, 1), "
                         f"got {attention_dropout!r}")


def apply_to_t5(model, *, urpe=False, attention_dropout=None):
    """Make every attention layer of a T5 / MT5 / UMT5 model run fastnotes.relpos_attention, in
    place (parameters and state_dict keys unchanged, plus the URPE tables with urpe=True).

    Args:
        model: a transformers model whose attention modules are T5Attention, MT5Attention or
            UMT5Attention (T5Model, T5ForConditionalGeneration, T5EncoderModel, MT5*, UMT5*, ...).
        urpe: add a learnable URPE table [H, num_buckets] (initialised to 1) to every
            self-attention layer, as the parameter ``urpe_table`` of that module.
        attention_dropout: None (default): dropout on the attention probabilities at the model's
            rate (config.dropout_rate) in training mode, inside the fused kernels; a number in
            [0, 1): that rate instead (0.0: none; the model's other dropout is unchanged).
    Returns the model. Applying it twice is a no-op when urpe agrees; urpe=True on a patched
    model adds the tables, urpe=False on a model that has them raises.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{_OP}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(urpe, bool):
        raise TypeError(f"{_OP}: urpe must be a bool, got {type(urpe).__name__}")
    _check_attention_dropout(_OP, attention_dropout)
    classes = _attention_classes()
    targets = [m for m in model.modules() if type(m) in classes or isinstance(m, _Patched)]
    if not targets:
        raise ValueError(f"{_OP}: model ({type(model).__name__}) has no T5 / MT5 / UMT5 attention layer "
                         f"(supported: {sorted(c.__name__ for c in classes)})")
    for m in targets:
        if not urpe and getattr(m, "urpe_table", None) is not None:
            raise ValueError(f"{_OP}: model already has URPE tables; urpe=False cannot remove them")
    cross_ids = {id(m) for name, m in model.named_modules() if name.endswith("EncDecAttention")}
    for m in targets:
        if not isinstance(m, _Patched):
            m.__class__ = _patched_class(type(m), classes[type(m)])
        if attention_dropout is not None:
            m.dropout = float(attention_dropout)
        if urpe and id(m) not in cross_ids and getattr(m, "urpe_table", None) is None:
            ref = m.q.weight
            m.urpe_table = torch.nn.Parameter(torch.ones(m.n_heads, m.relative_attention_num_buckets,
                                                         dtype=ref.dtype, device=ref.device))
    _set_implementation(model, ATTN_IMPLEMENTATION)
    return model


def load_urpe_pretrained(cls, path, **kwargs):
    """Load a checkpoint saved from a model patched with urpe=True: ``cls.from_pretrained(path)``,
    apply_to_t5(urpe=True), then the URPE tables from the checkpoint's state dict."""
    model = cls.from_pretrained(path, **kwargs)
    apply_to_t5(model, urpe=True)
    state = _read_state(path)
    tables = {k: v for k, v in state.items() if k.endswith("urpe_table")}
    if not tables:
        raise ValueError(f"load_urpe_pretrained: {path} holds no urpe_table entries (was it saved with urpe=True?)")
    unexpected = []
    own = dict(model.named_parameters())
    for key, value in tables.items():
        if key not in own:
            unexpected.append(key)
            continue
        with torch.no_grad():
            own[key].copy_(value)
    absent = [k for k in own if k.endswith("urpe_table") and k not in tables]
    if unexpected or absent:
        raise ValueError(f"load_urpe_pretrained: URPE tables do not match the model: unexpected {unexpected}, "
                         f"missing {absent}")
    return model


def _read_state(path):
    import glob
    import os

    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"load_urpe_pretrained: no .safetensors file in {path}")
    state = {}
    for f in files:
        state.update(load_file(f))
    return state


# ---- ALiBi: BLOOM ----------------------------------------------------------------------------------
#
# BLOOM adds slope_h * p_j to the logits, p_j the key's position among the row's unpadded tokens
# (cumsum of the mask); with the causal mask that is -slope_h * (i - j) plus a constant per query
# row (which the softmax cancels) whenever a row's tokens are one unpadded run (left or right
# padding), i.e. relpos_attention's ALiBi term. A mask with holes would give other positions, so
# the mask hook refuses it.

ATTN_IMPLEMENTATION_BLOOM = "fastnotes_bloom"
_BLOOM_OP = "apply_to_bloom"


def _bloom_padding_mask(batch_size, q_length, kv_length, attention_mask=None, **_):
    """BLOOM's mask hook: the 2-D padding mask as for T5, refused when a row's tokens are not one run."""
    mask = _padding_mask(batch_size, q_length, kv_length, attention_mask)
    if mask is not None:
        runs = (mask[:, 1:] & ~mask[:, :-1]).sum(1) + mask[:, 0]
        if bool((runs > 1).any()):
            raise ValueError(f"{_BLOOM_OP}: an attention_mask row has padding between tokens; BLOOM's positions "
                             "then differ from the distances ALiBi is computed from (left or right padding only)")
    return mask


AttentionMaskInterface.register(ATTN_IMPLEMENTATION_BLOOM, _bloom_padding_mask)
AttentionInterface.register(ATTN_IMPLEMENTATION_BLOOM, _not_called)


class _PatchedBloom:
    """Mixin put in front of BloomAttention."""

    def forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                output_attentions=False, cache=None, **kwargs):
        if output_attentions:
            raise ValueError(f"{_BLOOM_OP}: output_attentions=True: the fused attention never forms the attention "
                             "probabilities")
        cache = layer_past if cache is None else cache
        batch, lq = hidden_states.shape[:2]
        q, k, v = self._reshape(self.query_key_value(hidden_states))
        past = int(cache.get_seq_length(self.layer_idx)) if cache is not None else 0
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        lk = k.shape[2]
        if lk != past + lq:
            raise NotImplementedError(f"{_BLOOM_OP}: the cache must hold exactly the past tokens (past {past} + new "
                                      f"{lq} != {lk} keys); static caches are not supported")
        slopes = self.__dict__.get("_fastnotes_slopes")
        if slopes is None or slopes.device != q.device:
            from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

            slopes = self._fastnotes_slopes = _get_alibi_slopes(self.num_heads, q.device)
        out = relpos_attention(q, k, v, causal=True, scale=self.inv_norm_factor, alibi_slopes=slopes,
                               key_padding_mask=_key_mask(attention_mask, batch, lk, _BLOOM_OP),
                               dropout_p=self.attention_dropout.p if self.training else 0.0)
        out = self.dense(out.transpose(1, 2).reshape(batch, lq, self.hidden_size))
        return residual + torch.nn.functional.dropout(out, self.hidden_dropout, self.training), None


def apply_to_bloom(model, *, attention_dropout=None):
    """Make every attention layer of a BLOOM model (BloomModel, BloomForCausalLM and the other
    Bloom heads) run fastnotes.relpos_attention with BLOOM's ALiBi slopes, in place (parameters
    and state_dict unchanged). Neither the [B, 1, Lq, Lk] mask nor the [B*H, Lq, Lk] scores are
    built; the model's [B*H, 1, Lk] alibi tensor is still made by BloomModel and ignored.

    Equal to BLOOM's eager attention when every attention_mask row is one run of tokens (left or
    right padding; a row with holes raises). Query rows at padded positions whose keys are all
    padding give 0 here (transformers gives an average of padding values there); no unpadded
    token sees them. Not supported (they raise): output_attentions=True, static caches, the
    sliced dense layer of pretraining_tp > 1 with slow_but_exact=True. Attention dropout runs in
    the fused kernels at config.attention_dropout, or at attention_dropout when given (as apply_to_t5).
    Returns the model; applying it twice is a no-op.
    """
    from transformers.models.bloom.modeling_bloom import BloomAttention

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{_BLOOM_OP}: model must be a torch.nn.Module, got {type(model).__name__}")
    _check_attention_dropout(_BLOOM_OP, attention_dropout)
    targets = [m for m in model.modules() if isinstance(m, BloomAttention)]
    if not targets:
        raise ValueError(f"{_BLOOM_OP}: model ({type(model).__name__}) has no BloomAttention layer")
    for m in targets:
        if m.pretraining_tp > 1 and m.slow_but_exact:
            raise NotImplementedError(f"{_BLOOM_OP}: pretraining_tp={m.pretraining_tp} with slow_but_exact=True "
                                      "(a dense layer summed in slices) is not supported; set slow_but_exact=False")
    for m in targets:
        if not isinstance(m, _PatchedBloom):
            m.__class__ = _patched_class(type(m), None, _PatchedBloom)
        if attention_dropout is not None:
            m.attention_dropout.p = float(attention_dropout)
    _set_implementation(model, ATTN_IMPLEMENTATION_BLOOM)
    return model


# ---- ZLPR for multi-label heads -------------------------------------------------------------------
#
#     trainer = Trainer(model, args, train_dataset=..., compute_loss_func=zlpr_loss)   # either this
#     apply_zlpr(model)                            # or this: model(..., labels=y).loss is the ZLPR loss
#     apply_zlpr(model, fused=True)                # large label sets: no [batch, num_labels] logits in training
#     predictions = outputs.logits > 0             # ZLPR's threshold is 0 (sigmoid(2 s) is the probability)

_ZLPR_IGNORE = -100  # transformers' ignore index: such label entries drop that class from that row


def _logits_of(op, outputs):
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):  # ModelOutput is an OrderedDict
        if "logits" not in outputs:
            raise ValueError(f"{op}: the model outputs have no 'logits' (keys: {list(outputs.keys())})")
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]  # return_dict=False without labels: logits come first
    raise TypeError(f"{op}: outputs must be a ModelOutput / dict with 'logits', a tuple starting with the logits, "
                    f"or a tensor; got {type(outputs).__name__}")


def _zlpr(op, logits, labels, num_items_in_batch):
    if labels is None:
        raise ValueError(f"{op}: labels is None; ZLPR needs the multi-hot labels [batch, num_labels] "
                         "(is the dataset column named 'labels'?)")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{op}: labels must be a tensor, got {type(labels).__name__}")
    if labels.shape != logits.shape:
        raise ValueError(f"{op}: labels must have the shape of the logits {tuple(logits.shape)} (multi-hot, one "
                         f"column per label), got {tuple(labels.shape)}")
    labels = labels.to(logits.device)
    mask = None
    if labels.dtype != torch.bool:
        ignored = labels == _ZLPR_IGNORE
        if bool(ignored.any()):
            mask, labels = ~ignored, labels.masked_fill(ignored, 0)
    if num_items_in_batch is None:
        return multilabel_ce(logits, labels, mask=mask)
    count = num_items_in_batch.item() if isinstance(num_items_in_batch, torch.Tensor) else num_items_in_batch
    if not count > 0:
        raise ValueError(f"{op}: num_items_in_batch must be positive, got {count!r}")
    return multilabel_ce(logits, labels, mask=mask, reduction="sum") * (logits.shape[-1] / count)


def zlpr_loss(outputs, labels, num_items_in_batch=None):
    """ZLPR (fastnotes.multilabel_ce) as a ``transformers.Trainer(compute_loss_func=zlpr_loss)``.

    Trainer calls it as ``zlpr_loss(outputs, labels, num_items_in_batch=...)`` after running the
    model without labels; ``outputs.logits`` [..., num_labels] are unbounded scores (predict label
    i when logit_i > 0), labels the multi-hot targets of the same shape (bool, {0, 1} or soft
    floats in [0, 1]); an entry -100 removes that label from that row.

    Normalisation: without num_items_in_batch the mean over rows (= multilabel_ce(logits,
    labels)). Trainer passes the number of label entries != -100 in the whole accumulated batch
    and then does not divide the loss by the accumulation steps itself, so the loss is
    sum(row losses) * num_labels / num_items_in_batch: the mean over the rows of the accumulated
    batch when no label is -100 (with -100 entries, each row counts as its kept labels / num_labels).
    """
    return _zlpr("zlpr_loss", _logits_of("zlpr_loss", outputs), labels, num_items_in_batch)


def _zlpr_forward_factory(original, positional_labels, classifier):
    """A forward that calls `original` (the model class's forward, unbound) without labels and
    puts the ZLPR loss in front of its outputs. With `classifier` (the dotted name of the head's
    output Linear) and labels in training mode, that Linear only records its input while the model
    runs and the loss is fastnotes.fused_linear_multilabel_ce of it. It holds no reference to a
    model instance, so copy.deepcopy of the model rebinds it to the copy."""

    def forward(self, *args, **kwargs):
        labels = kwargs.pop("labels", None)
        if positional_labels is not None and len(args) > positional_labels:
            if labels is not None:
                raise TypeError("forward got labels both positionally and as a keyword")
            labels, args = args[positional_labels], args[:positional_labels] + (None,) + args[positional_labels + 1:]
        num_items = kwargs.pop("num_items_in_batch", None)
        if classifier is not None and labels is not None and self.training:
            return _fused_zlpr_forward(self, original, classifier, args, kwargs, labels, num_items)
        outputs = original(self, *args, **kwargs)
        if labels is None:
            return outputs
        loss = _zlpr("apply_zlpr", _logits_of("apply_zlpr", outputs), labels, num_items)
        return _with_loss(outputs, loss)

    return forward


def _with_loss(outputs, loss, **replace):
    if isinstance(outputs, tuple):
        return (loss, *outputs)
    fields = {k: v for k, v in outputs.items() if k != "loss"}
    fields.update(replace)
    return type(outputs)(loss=loss, **fields)


def _fused_zlpr_forward(model, original, classifier, args, kwargs, labels, num_items):
    """Training forward of apply_zlpr(fused=True): the output Linear hands its input over instead of
    computing [..., C] logits (it returns a stride-0 zero view of that shape, which the model only
    passes through), and the loss comes from that input and the Linear's weight and bias."""
    op = "apply_zlpr"
    from ..zlpr import fused_linear_multilabel_ce

    linear = model.get_submodule(classifier)
    inputs = []

    def capture(hidden):
        inputs.append(hidden)
        return hidden.new_zeros(()).expand(*hidden.shape[:-1], linear.out_features)

    linear.forward = capture  # an instance attribute for this call only: deleted below
    try:
        outputs = original(model, *args, **kwargs)
    finally:
        del linear.forward
    if len(inputs) != 1:
        raise RuntimeError(f"{op}: the classifier {classifier!r} ran {len(inputs)} times in one forward; fused=True "
                           "needs a head that applies it once to the features")
    hidden = inputs[0]
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{op}: labels must be a tensor, got {type(labels).__name__}")
    shape = (*hidden.shape[:-1], linear.out_features)
    if tuple(labels.shape) != shape:
        raise ValueError(f"{op}: labels must have the shape of the logits {shape} (multi-hot, one column per label), "
                         f"got {tuple(labels.shape)}")
    labels = labels.to(hidden.device)
    if labels.dtype != torch.bool and bool((labels == _ZLPR_IGNORE).any()):
        raise ValueError(f"{op}: labels hold -100 (ignored entries), which the fused form does not support; use "
                         "apply_zlpr(model) without fused=True")
    if num_items is None:
        loss = fused_linear_multilabel_ce(hidden, linear.weight, labels, bias=linear.bias)
    else:
        count = num_items.item() if isinstance(num_items, torch.Tensor) else num_items
        if not count > 0:
            raise ValueError(f"{op}: num_items_in_batch must be positive, got {count!r}")
        loss = fused_linear_multilabel_ce(hidden, linear.weight, labels, bias=linear.bias, reduction="sum") * (
            linear.out_features / count)
    if isinstance(outputs, tuple):
        return (loss, *(None if isinstance(o, torch.Tensor) and o.shape == shape and o.stride()[-1] == 0 else o
                        for o in outputs))
    return _with_loss(outputs, loss, logits=None)


def _find_classifier(op, model, classifier):
    """The dotted name of the head's output Linear: `classifier` when given, else the only
    nn.Linear with config.num_labels outputs."""
    if classifier is not None:
        if not isinstance(classifier, str):
            raise TypeError(f"{op}: classifier must be the dotted name of a submodule, got {type(classifier).__name__}")
        try:
            module = model.get_submodule(classifier)
        except AttributeError as error:
            raise ValueError(f"{op}: model has no submodule {classifier!r}") from error
        if type(module) is not torch.nn.Linear:
            raise ValueError(f"{op}: classifier {classifier!r} must be a torch.nn.Linear, got {type(module).__name__}")
        return classifier
    found = [name for name, m in model.named_modules()
             if type(m) is torch.nn.Linear and m.out_features == model.config.num_labels]
    if len(found) != 1:
        raise ValueError(f"{op}: fused=True needs the head's output Linear; found {len(found)} nn.Linear with "
                         f"num_labels={model.config.num_labels} outputs ({found}): name it with classifier=")
    return found[0]


def apply_zlpr(model, *, fused=False, classifier=None):
    """Make a multi-label classification model compute the ZLPR loss instead of BCE, in place.

    For the ``*ForSequenceClassification`` (and similar) heads of transformers with
    ``config.problem_type = "multi_label_classification"`` (set here when it is None):
    ``model(..., labels=y)`` runs the model without labels and returns its outputs with
    ``loss = fastnotes.multilabel_ce(logits, y)`` (labels multi-hot [batch, num_labels], -100
    drops an entry; under Trainer the loss is normalised by its num_items_in_batch as in
    zlpr_loss). Predict label i when logits[:, i] > 0 (not sigmoid(logit) > 0.5 as with BCE: ZLPR
    ties the threshold to 0 for every row). Parameters, state_dict, save_pretrained are
    unchanged; the patch lives on the instance, so a model loaded again with from_pretrained
    needs apply_zlpr again. Applying it twice with the same arguments is a no-op. Returns the model.

    fused=True, for large label sets: in training mode with labels, the head's output Linear
    (``classifier``, its dotted name, e.g. "classifier" or "classifier.out_proj"; default: the only
    nn.Linear with num_labels outputs) computes no logits: the loss is
    fastnotes.fused_linear_multilabel_ce of the Linear's input, weight and bias, so the [batch,
    num_labels] logits and their gradient never exist (one row chunk at a time), and
    ``outputs.logits`` is None (a tuple output has None in their place). In eval mode or without
    labels the model returns its logits as usual (the loss, with labels, from them). Labels with
    -100 entries raise in the fused form.
    """
    op = "apply_zlpr"
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(fused, bool):
        raise TypeError(f"{op}: fused must be a bool, got {type(fused).__name__}")
    if classifier is not None and not fused:
        raise ValueError(f"{op}: classifier= only applies with fused=True")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "problem_type") or not hasattr(config, "num_labels"):
        raise ValueError(f"{op}: model ({type(model).__name__}) has no transformers config with problem_type and "
                         "num_labels; for other models use zlpr_loss / fastnotes.multilabel_ce on the logits")
    if config.problem_type not in (None, "multi_label_classification"):
        raise ValueError(f"{op}: model.config.problem_type is {config.problem_type!r}; ZLPR replaces the loss of "
                         "multi_label_classification heads only")
    classifier = _find_classifier(op, model, classifier) if fused else None
    current = model.forward
    applied = getattr(getattr(current, "__func__", None), "_fastnotes_zlpr_classifier", False)
    if applied is not False:
        if applied != classifier:
            raise ValueError(f"{op}: the model already has apply_zlpr with classifier={applied!r}; apply it to a "
                             "fresh model to change fused / classifier")
        return model
    if not (isinstance(current, types.MethodType) and current.__self__ is model):
        raise ValueError(f"{op}: model.forward is not the model's own bound method (already patched by something "
                         "else?); apply_zlpr would not know what to wrap")
    signature = inspect.signature(current.__func__)
    if "labels" not in signature.parameters:
        raise ValueError(f"{op}: {type(model).__name__}.forward takes no labels argument; it is not a "
                         "classification head")
    params = list(signature.parameters.values())
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    index = positional.index("labels") - 1 if "labels" in positional else None  # -1: self
    forward = _zlpr_forward_factory(current.__func__, index, classifier)
    functools.update_wrapper(forward, current.__func__)
    del forward.__wrapped__  # the signature below is the one to report, not the unwrapped one
    forward.__signature__ = signature  # Trainer reads forward's parameters to pick dataset columns
    forward._fastnotes_zlpr_classifier = classifier
    config.problem_type = "multi_label_classification"
    model.forward = types.MethodType(forward, model)
    return model
