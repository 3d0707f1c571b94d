"""fastnotes.integrations.transformers: T5 / MT5 / UMT5 with relpos_attention vs transformers' eager
attention on tiny random models (nothing downloaded)."""
import copy
import importlib
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastnotes.integrations import transformers as fhf

EPS = torch.finfo(torch.float32).eps
# the fused kernels and eager attention sum the same float32 terms in different orders: a few
# hundred ulps of the largest magnitude over 2 layers of attention, layer norms and projections
ULPS = 256

COMMON = {"vocab_size": 64, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2, "num_decoder_layers": 2,
          "num_heads": 4, "dropout_rate": 0.0, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
          "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1, "attn_implementation": "eager"}

FAMILIES = {
    "t5-v1.0": ("T5Config", "T5ForConditionalGeneration", {"feed_forward_proj": "relu"}),
    "t5-v1.1": ("T5Config", "T5ForConditionalGeneration",
                {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", {"feed_forward_proj": "gated-gelu"}),
    "umt5": ("UMT5Config", "UMT5ForConditionalGeneration", {"feed_forward_proj": "gated-gelu"}),
}


def build(family, cls_name=None, seed=0, **extra):
    config_name, default_cls, options = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **options, **extra})
    torch.manual_seed(seed)
    return getattr(transformers, cls_name or default_cls)(config).eval()


def patched(model, **kwargs):
    return fhf.apply_to_t5(copy.deepcopy(model), **kwargs)


def batch(seed=1, b=3, ls=23, lt=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 64, (b, ls), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    mask[2, 5:] = 0
    dec = torch.randint(2, 64, (b, lt), generator=g)
    dec_mask = torch.ones_like(dec)
    dec_mask[2, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec,
            "decoder_attention_mask": dec_mask}


def assert_near(actual, expected, what):
    tol = ULPS * EPS * max(expected.abs().max().item(), 1.0)
    err = (actual - expected).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_and_gradients_match_eager(family):
    ref = build(family)
    pat = patched(ref)
    inputs = batch()
    weights = torch.randn(3, 11, 64, generator=torch.Generator().manual_seed(2))
    outs = []
    for model in (ref, pat):
        model.zero_grad()
        out = model(**inputs)
        (out.logits * weights).sum().backward()
        outs.append(out)
    assert_near(outs[1].encoder_last_hidden_state, outs[0].encoder_last_hidden_state, "encoder output")
    assert_near(outs[1].logits, outs[0].logits, "decoder logits")
    ref_params = dict(ref.named_parameters())
    for name, p in pat.named_parameters():
        assert p.grad is not None, name
        assert_near(p.grad, ref_params[name].grad, f"gradient of {name}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_same_tokens(family):
    ref = build(family)
    pat = patched(ref)
    inputs = batch()
    kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "max_new_tokens": 20,
              "min_new_tokens": 20, "do_sample": False, "num_beams": 1}
    expected = ref.generate(**kwargs)
    assert expected.shape[1] == 21
    assert torch.equal(pat.generate(**kwargs), expected)


@pytest.mark.parametrize("cls_name", ["T5EncoderModel", "T5Model"])
def test_encoder_model_and_base_model(cls_name):
    ref = build("t5-v1.1", cls_name)
    pat = patched(ref)
    inputs = batch()
    if cls_name == "T5EncoderModel":
        inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    expected, actual = ref(**inputs).last_hidden_state, pat(**inputs).last_hidden_state
    assert_near(actual, expected, cls_name)


def test_no_dense_bias_or_mask(monkeypatch):
    """The patched model never calls compute_bias (the [1, H, Lq, Lk] bias) nor an [Lq, Lk] mask builder."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.models.t5.modeling_t5 import T5Attention

    pat = patched(build("t5-v1.0"))

    def boom(*args, **kwargs):
        raise AssertionError("dense [Lq, Lk] tensor built")

    monkeypatch.setattr(T5Attention, "compute_bias", boom)
    for name in ("eager", "sdpa"):
        monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, name, boom)
    pat(**batch())
    pat.generate(input_ids=batch()["input_ids"], attention_mask=batch()["attention_mask"], max_new_tokens=3,
                 do_sample=False)


def _without_residual_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


@pytest.mark.parametrize("family", ["t5-v1.0", "umt5"])
def test_attention_dropout_in_training_matches_eager_with_the_same_masks(family, monkeypatch):
    """Training mode with attention dropout (p = 0.3; the residual dropout set to 0 so that only
    attention dropout differs): the patched model equals transformers' eager attention whose
    dropout on the attention weights is given fastnotes' hash mask, seeded from torch's generator
    in the same order: loss and every parameter gradient."""
    from fastnotes.reference.attention import dropout_keep

    ref = _without_residual_dropout(build(family, dropout_rate=0.3)).train()
    pat = patched(ref).train()
    assert all(m.dropout == 0.3 for m in pat.modules() if isinstance(m, fhf._Patched))
    inputs = batch()
    labels = inputs["decoder_input_ids"]
    dropout = torch.nn.functional.dropout
    calls = []

    def hashed_dropout(x, p=0.5, training=True, inplace=False):
        if x.dim() != 4 or not training or p == 0:
            return dropout(x, p, training, inplace)
        calls.append(x.shape)
        seed = int(torch.randint(2 ** 32, (), dtype=torch.int64))  # as relpos_attention draws it
        return x * dropout_keep(seed, *x.shape, p).to(x.dtype) / (1 - p)

    runs = []
    for model in (ref, pat):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        with monkeypatch.context() as m:
            if model is ref:
                m.setattr(torch.nn.functional, "dropout", hashed_dropout)
            loss = model(**inputs, labels=labels).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert len(calls) == 6  # 2 encoder self, 2 decoder self, 2 cross
    (loss_ref, grads_ref), (loss_pat, grads_pat) = runs
    assert_near(loss_pat, loss_ref, "loss")
    for name, grad in grads_ref.items():
        assert_near(grads_pat[name], grad, name)
    torch.manual_seed(7)
    with torch.no_grad():
        eval_loss = pat.eval()(**inputs, labels=labels).loss
    assert abs(eval_loss - loss_pat) > 1e-3  # dropout did something


def test_attention_dropout_rate_set_or_turned_off():
    ref = build("t5-v1.0", dropout_rate=0.1)
    dropped = patched(ref, attention_dropout=0.0).train()
    dropped(**batch()).logits.sum().backward()  # residual dropout still runs, attention dropout is off
    assert all(m.dropout == 0.0 for m in dropped.modules() if isinstance(m, fhf._Patched))
    assert dropped.encoder.dropout.p == 0.1
    other = patched(ref, attention_dropout=0.25)
    assert all(m.dropout == 0.25 for m in other.modules() if isinstance(m, fhf._Patched))


def test_bad_arguments():
    model = build("t5-v1.0")
    with pytest.raises(ValueError, match="no T5 / MT5 / UMT5 attention"):
        fhf.apply_to_t5(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model"):
        fhf.apply_to_t5("t5-small")
    with pytest.raises(TypeError, match="urpe"):
        fhf.apply_to_t5(model, urpe=1)
    for bad in (1.0, -0.1, "0.1", True):
        with pytest.raises(ValueError, match="attention_dropout"):
            fhf.apply_to_t5(model, attention_dropout=bad)
    pat = patched(model, urpe=True)
    with pytest.raises(ValueError, match="urpe=False"):
        fhf.apply_to_t5(pat)
    enc = patched(build("t5-v1.0", "T5EncoderModel"))
    ids = batch()["input_ids"]
    with pytest.raises(ValueError, match="attention_mask"):
        enc(input_ids=ids, attention_mask=torch.zeros(3, 1, 23, 23))


def test_urpe_starts_equal_then_trains_and_round_trips(tmp_path):
    ref = build("t5-v1.1")
    pat = patched(ref, urpe=True)
    tables = {n: p for n, p in pat.named_parameters() if n.endswith("urpe_table")}
    # one per self-attention layer (encoder 2, decoder 2), none in cross-attention
    assert sorted(tables) == sorted(f"{s}.block.{i}.layer.0.SelfAttention.urpe_table"
                                    for s in ("encoder", "decoder") for i in range(2))
    inputs = batch()
    assert_near(pat(**inputs).logits, ref(**inputs).logits, "urpe at init")
    opt = torch.optim.Adam(pat.parameters(), lr=1e-2)
    pat.train()
    for _ in range(3):
        opt.zero_grad()
        pat(**inputs, labels=inputs["decoder_input_ids"]).loss.backward()
        opt.step()
    pat.eval()
    assert all((t - 1).abs().max() > 1e-3 for t in tables.values())
    with torch.no_grad():
        logits = pat(**inputs).logits
    assert (logits - ref(**inputs).logits).abs().max() > 1e-3
    pat.save_pretrained(tmp_path)
    loaded = fhf.load_urpe_pretrained(transformers.T5ForConditionalGeneration, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, logits)
    with pytest.raises(ValueError, match="urpe_table"):
        ref.save_pretrained(tmp_path / "plain")
        fhf.load_urpe_pretrained(transformers.T5ForConditionalGeneration, tmp_path / "plain")


def test_import_without_transformers_names_the_extra(monkeypatch):
    for name in [n for n in sys.modules if n == "transformers" or n.startswith("transformers.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "fastnotes.integrations.transformers")
    with pytest.raises(ImportError, match=r"fastnotes\[hf\]"):
        importlib.import_module("fastnotes.integrations.transformers")


def test_static_cache_refused():
    pat = patched(build("t5-v1.0"))
    inputs = batch()
    with pytest.raises(NotImplementedError, match="static caches"):
        pat.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=4,
                     do_sample=False, cache_implementation="static")


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_patched_model_under_torch_compile(compiler):
    """torch.compile of a patched encoder-decoder: the fused attention is a graph break
    (_dispatch.eager_op), the rest traced; loss and every parameter gradient as in eager mode."""
    model = patched(build("t5-v1.1"))
    inputs = batch()
    labels = inputs["decoder_input_ids"]
    runs = []
    for compiled in (False, True):
        model.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        fn = torch.compile(model, backend=compiler) if compiled else model
        loss = fn(**inputs, labels=labels).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_eager, grads_eager), (loss_compiled, grads_compiled) = runs
    assert_near(loss_compiled, loss_eager, "loss")
    assert grads_compiled.keys() == grads_eager.keys() and len(grads_eager) > 10
    for name, grad in grads_eager.items():
        assert_near(grads_compiled[name], grad, name)


def test_patched_model_from_threads():
    """Two threads running one patched model at once (a server's request threads) each get what
    a lone call gives."""
    import threading

    model = patched(build("mt5"))
    inputs = [batch(seed) for seed in (3, 4)]
    with torch.no_grad():
        expected = [model(**x).logits for x in inputs]
        got = [None, None]
        errors = []

        def run(i):
            try:
                for _ in range(5):
                    got[i] = model(**inputs[i]).logits
                    assert torch.equal(got[i], expected[i])
            except Exception as error:  # re-raised in the main thread
                errors.append(error)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


def test_gradient_checkpointing_with_attention_dropout():
    """model.activation_checkpointing_enable() on a patched model in training with attention dropout:
    the recomputed layers draw the same masks, so loss and gradients equal the run without it."""
    base = _without_residual_dropout(build("t5-v1.1", dropout_rate=0.2))
    inputs = batch()
    runs = []
    for checkpointing in (False, True):
        model = patched(base).train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
            assert model.is_activation_checkpointing
        torch.manual_seed(5)
        loss = model(**inputs, labels=inputs["decoder_input_ids"]).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = runs
    assert torch.equal(loss_plain, loss_ckpt)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name, grad in grads_plain.items():
        assert torch.equal(grads_ckpt[name], grad), name
