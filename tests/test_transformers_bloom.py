"""fastnotes.integrations.transformers.apply_to_bloom: BLOOM's ALiBi attention through
relpos_attention vs transformers' eager attention on tiny random models (nothing downloaded)."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastnotes.integrations import transformers as fhf

EPS = torch.finfo(torch.float32).eps
ULPS = 256  # as for T5: the same float32 terms summed in other orders over 2 layers


def build(cls_name="BloomForCausalLM", **extra):
    options = {"vocab_size": 64, "hidden_size": 32, "n_layer": 2, "n_head": 4, "attn_implementation": "eager",
               "hidden_dropout": 0.0, "attention_dropout": 0.0, "pad_token_id": 0, "bos_token_id": 1,
               "eos_token_id": 1, **extra}
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(transformers.BloomConfig(**options)).eval()


def patched(model, **kwargs):
    return fhf.apply_to_bloom(copy.deepcopy(model), **kwargs)


def inputs(left=False):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 64, (3, 19), generator=g)
    mask = torch.ones_like(ids)
    if left:
        mask[1, :5], mask[2, :9] = 0, 0
    else:
        mask[1, 12:], mask[2, 4:] = 0, 0
    return ids, mask


def assert_near(actual, expected, what):
    tol = ULPS * EPS * max(expected.abs().max().item(), 1.0)
    err = (actual - expected).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("n_head", [4, 6], ids=["heads-4", "heads-6"])  # 6: BLOOM's slopes for H not a power of 2
def test_forward_and_gradients_match_eager(n_head):
    ref = build(n_head=n_head, hidden_size=8 * n_head)
    pat = patched(ref)
    ids, mask = inputs()
    weights = torch.randn(3, 19, 64, generator=torch.Generator().manual_seed(2))
    outs = []
    for model in (ref, pat):
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask)
        (out.logits * weights).sum().backward()
        outs.append(out.logits)
    assert_near(outs[1], outs[0], "logits")
    ref_params = dict(ref.named_parameters())
    for name, p in pat.named_parameters():
        assert_near(p.grad, ref_params[name].grad, f"gradient of {name}")


def test_left_padding_and_no_mask():
    """Left padding: equal at the unpadded positions (padded query rows see only padding: 0 here,
    an average of padding in transformers); no mask at all: equal everywhere."""
    ref = build("BloomModel")
    model = patched(ref)
    ids, mask = inputs(left=True)
    expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    actual = model(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    assert_near(actual[keep], expected[keep], "unpadded positions")
    assert_near(model(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state, "no mask")


@pytest.mark.parametrize("left", [False, True], ids=["no-padding", "left-padding"])
def test_generate_same_tokens(left):
    ref = build()
    pat = patched(ref)
    ids, mask = inputs(left=True)
    kwargs = {"input_ids": ids, "max_new_tokens": 20, "min_new_tokens": 20, "do_sample": False, "num_beams": 1}
    if left:
        kwargs["attention_mask"] = mask
    expected = ref.generate(**kwargs)
    assert expected.shape[1] == 39
    assert torch.equal(pat.generate(**kwargs), expected)


def test_no_dense_mask_or_scores(monkeypatch):
    """The patched model never builds transformers' [B, 1, Lq, Lk] mask nor runs the eager scores."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.models.bloom.modeling_bloom import BloomAttention

    pat = patched(build())

    def boom(*args, **kwargs):
        raise AssertionError("dense [Lq, Lk] tensor built")

    monkeypatch.setattr(BloomAttention, "forward", boom)
    for name in ("eager", "sdpa"):
        monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, name, boom)
    ids, mask = inputs(left=True)
    pat(input_ids=ids, attention_mask=mask)
    pat.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)


def test_attention_dropout_in_training():
    """config.attention_dropout runs in the fused kernels in training mode: outputs change with the
    seed, repeat under torch.manual_seed, gradients flow; eval mode and attention_dropout=0.0 give
    the dropout-free output."""
    ids, mask = inputs()
    pat = patched(build(attention_dropout=0.4)).train()
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(pat(input_ids=ids, attention_mask=mask).logits)
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])
    outs[0].sum().backward()
    assert all(p.grad is not None for p in pat.parameters() if p.requires_grad)
    with torch.no_grad():
        clean = pat.eval()(input_ids=ids, attention_mask=mask).logits
        off = fhf.apply_to_bloom(pat, attention_dropout=0.0).train()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(off, clean, rtol=0, atol=0)


def test_unsupported_raise():
    ids, mask = inputs()
    pat = patched(build())
    holes = mask.clone()
    holes[0, 3] = 0
    with pytest.raises(ValueError, match="padding between tokens"):
        pat(input_ids=ids, attention_mask=holes)
    with pytest.raises(ValueError, match="output_attentions"):
        pat(input_ids=ids, output_attentions=True)
    with pytest.raises(NotImplementedError, match="static caches"):
        pat.generate(input_ids=ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
    with pytest.raises(NotImplementedError, match="slow_but_exact"):
        fhf.apply_to_bloom(build(pretraining_tp=2, slow_but_exact=True))
    with pytest.raises(ValueError, match="no BloomAttention"):
        fhf.apply_to_bloom(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="attention_dropout"):
        fhf.apply_to_bloom(build(), attention_dropout=1.5)
    assert fhf.apply_to_bloom(pat) is pat  # twice: a no-op
