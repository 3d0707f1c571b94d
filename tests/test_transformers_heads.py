"""fastnotes.integrations.transformers on Hugging Face heads and backbones: the ZLPR loss for
multi-label classification heads (Trainer's compute_loss_func and apply_zlpr) and Ladder
Side-Tuning over BertModel / T5EncoderModel through LadderSideNetwork.from_hooks. Tiny random
models built from configs; nothing downloaded."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastnotes  # noqa: E402
from fastnotes.integrations import transformers as fhf  # noqa: E402

EPS = torch.finfo(torch.float32).eps
VOCAB, LABELS, HIDDEN = 50, 6, 32


def bert_classifier(seed=0, **extra):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=LABELS,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     **{"problem_type": "multi_label_classification", **extra})
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config)


def toy_batch(seed=1, n=8, length=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    labels = (torch.rand(n, LABELS, generator=g) > 0.5).float()
    return ids, labels


def assert_close(actual, expected, what, ulps=64):
    actual, expected = (float(x.detach()) if isinstance(x, torch.Tensor) else float(x) for x in (actual, expected))
    tol = ulps * EPS * max(abs(float(expected)), 1.0)
    assert abs(float(actual) - float(expected)) <= tol, f"{what}: {float(actual)} vs {float(expected)}"


# ---- ZLPR ------------------------------------------------------------------------------------------

def test_zlpr_loss_equals_multilabel_ce_on_the_logits():
    model = bert_classifier()
    ids, labels = toy_batch()
    outputs = model(input_ids=ids)
    expected = fastnotes.multilabel_ce(outputs.logits, labels)
    assert_close(fhf.zlpr_loss(outputs, labels), expected, "mean")
    # Trainer's num_items_in_batch (label entries != -100 in the accumulated batch): the mean over rows
    assert_close(fhf.zlpr_loss(outputs, labels, num_items_in_batch=torch.tensor(labels.numel())), expected, "num_items")
    # with 2 accumulated micro-batches the share of this one is half
    assert_close(fhf.zlpr_loss(outputs, labels, num_items_in_batch=2 * labels.numel()), expected / 2, "accumulated")
    assert_close(fhf.zlpr_loss(outputs.to_tuple(), labels), expected, "tuple outputs")
    # -100 drops the entry from its row: the masked loss
    ignored = labels.clone()
    ignored[0, :2] = -100
    mask = ignored != -100
    assert_close(fhf.zlpr_loss(outputs, ignored),
                 fastnotes.multilabel_ce(outputs.logits, labels.masked_fill(~mask, 0), mask=mask), "ignored")


def test_zlpr_loss_gradients_reach_the_model():
    model = bert_classifier()
    ids, labels = toy_batch()
    logits = model(input_ids=ids).logits
    leaf = logits.detach().requires_grad_(True)
    fastnotes.multilabel_ce(leaf, labels).backward()
    logits.retain_grad()
    fhf.zlpr_loss({"logits": logits}, labels).backward()
    torch.testing.assert_close(logits.grad, leaf.grad, rtol=0, atol=16 * EPS)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert model.classifier.weight.grad.abs().sum() > 0
    assert model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_zlpr_loss_errors():
    outputs = {"logits": torch.zeros(2, LABELS)}
    with pytest.raises(ValueError, match="labels is None"):
        fhf.zlpr_loss(outputs, None)
    with pytest.raises(ValueError, match="labels must have the shape"):
        fhf.zlpr_loss(outputs, torch.zeros(2, LABELS + 1))
    with pytest.raises(ValueError, match="no 'logits'"):
        fhf.zlpr_loss({"loss": torch.zeros(())}, torch.zeros(2, LABELS))
    with pytest.raises(ValueError, match="num_items_in_batch"):
        fhf.zlpr_loss(outputs, torch.zeros(2, LABELS), num_items_in_batch=0)
    with pytest.raises(ValueError, match="targets must lie in"):
        fhf.zlpr_loss(outputs, torch.full((2, LABELS), 2.0))


def test_apply_zlpr_replaces_bce():
    model = bert_classifier()
    ids, labels = toy_batch()
    bce = model(input_ids=ids, labels=labels)
    patched = fhf.apply_zlpr(copy.deepcopy(model))
    assert fhf.apply_zlpr(patched) is patched  # twice: no-op
    out = patched(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, bce.logits, rtol=0, atol=0)
    expected = fastnotes.multilabel_ce(bce.logits, labels)
    assert_close(out.loss, expected, "loss")
    assert abs(out.loss.item() - bce.loss.item()) > 1e-3  # not BCE any more
    assert list(out.keys()) == ["loss", "logits"]
    as_tuple = patched(input_ids=ids, labels=labels, return_dict=False)
    assert_close(as_tuple[0], expected, "return_dict=False")
    assert patched(input_ids=ids).loss is None
    # a copy runs its own weights, not the original's
    clone = copy.deepcopy(patched)
    with torch.no_grad():
        clone.classifier.bias.add_(1.0)
    assert not torch.equal(clone(input_ids=ids, labels=labels).logits, out.logits)
    # problem_type None (transformers would pick it from the labels) is set; another one raises
    fresh = bert_classifier(problem_type=None)
    assert fhf.apply_zlpr(fresh).config.problem_type == "multi_label_classification"
    with pytest.raises(ValueError, match="problem_type"):
        fhf.apply_zlpr(bert_classifier(problem_type="single_label_classification"))
    with pytest.raises(ValueError, match="config"):
        fhf.apply_zlpr(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model"):
        fhf.apply_zlpr("bert")


def test_apply_zlpr_trains_to_logits_above_zero():
    """ZLPR's decision rule: after fitting a fixed batch, logits > 0 are exactly the labels."""
    model = fhf.apply_zlpr(bert_classifier())
    ids, labels = toy_batch(n=6)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(40):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        predicted = model(input_ids=ids).logits > 0
    assert torch.equal(predicted, labels.bool())


def wide_classifier(cls_name="BertForSequenceClassification", labels=300, seed=0):
    """A multi-label head with more labels than features (the fused form's use)."""
    config_name = cls_name.replace("ForSequenceClassification", "Config")
    config = getattr(transformers, config_name)(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, num_labels=labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        problem_type="multi_label_classification", pad_token_id=1)
    torch.manual_seed(seed)
    return getattr(transformers, cls_name)(config)


@pytest.mark.parametrize("cls_name, name", [("BertForSequenceClassification", "classifier"),
                                            ("RobertaForSequenceClassification", "classifier.out_proj")])
def test_apply_zlpr_fused_equals_unfused(cls_name, name):
    model = wide_classifier(cls_name).train()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(2, VOCAB, (5, 9), generator=g)
    labels = (torch.rand(5, 300, generator=g) < 0.05).float()
    plain = fhf.apply_zlpr(copy.deepcopy(model))
    fused = fhf.apply_zlpr(copy.deepcopy(model), fused=True)
    assert fhf.apply_zlpr(fused, fused=True) is fused  # twice: no-op
    calls = []
    fused.get_submodule(name).register_forward_hook(lambda m, i, o: calls.append(o.stride()))
    results = []
    for m in (plain, fused):
        out = m(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(2 * labels.numel()))
        out.loss.backward()
        results.append(out)
    assert results[1].logits is None  # no [batch, num_labels] logits in a fused training step
    assert calls == [(0, 0)]  # the Linear returned its stride-0 placeholder, no GEMM
    assert_close(results[1].loss, results[0].loss, "fused loss", ulps=256)
    plain_params = dict(plain.named_parameters())
    for pname, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, plain_params[pname].grad, rtol=1e-4, atol=1e-6, msg=pname)
    as_tuple = fused(input_ids=ids, labels=labels, return_dict=False)
    assert_close(as_tuple[0], results[0].loss * 2, "tuple loss", ulps=256)  # no num_items: the plain mean
    assert as_tuple[1] is None
    # eval mode: logits as usual, the loss from them
    fused.eval(), plain.eval()
    with torch.no_grad():
        got, expected = fused(input_ids=ids, labels=labels), plain(input_ids=ids, labels=labels)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    assert_close(got.loss, expected.loss, "eval loss")


def test_apply_zlpr_fused_errors():
    model = wide_classifier().train()
    ids = torch.randint(2, VOCAB, (2, 5))
    fused = fhf.apply_zlpr(copy.deepcopy(model), fused=True)
    labels = torch.zeros(2, 300)
    labels[0, 0] = -100
    with pytest.raises(ValueError, match="-100"):
        fused(input_ids=ids, labels=labels)
    with pytest.raises(ValueError, match="shape of the logits"):
        fused(input_ids=ids, labels=torch.zeros(2, 299))
    with pytest.raises(ValueError, match="classifier="):
        fhf.apply_zlpr(fused)  # another configuration on a patched model
    with pytest.raises(ValueError, match="only applies with fused=True"):
        fhf.apply_zlpr(copy.deepcopy(model), classifier="classifier")
    with pytest.raises(ValueError, match="no submodule"):
        fhf.apply_zlpr(copy.deepcopy(model), fused=True, classifier="head")
    with pytest.raises(ValueError, match="must be a torch.nn.Linear"):
        fhf.apply_zlpr(copy.deepcopy(model), fused=True, classifier="bert")
    with pytest.raises(TypeError, match="fused"):
        fhf.apply_zlpr(copy.deepcopy(model), fused=1)
    # num_labels == hidden size: several candidate Linears, the name is needed
    square = wide_classifier(labels=HIDDEN)
    with pytest.raises(ValueError, match="name it with classifier="):
        fhf.apply_zlpr(copy.deepcopy(square), fused=True)
    fhf.apply_zlpr(square, fused=True, classifier="classifier").train()
    assert square(input_ids=ids, labels=torch.zeros(2, HIDDEN)).logits is None


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=16):
        self.ids, self.labels = toy_batch(seed=3, n=n)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _trainer(model, tmp_path, **kwargs):
    # transformers' Trainer needs accelerate (transformers[torch]); without it these tests skip
    pytest.importorskip("accelerate", minversion="1.1.0")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          gradient_accumulation_steps=2, learning_rate=1e-3, use_cpu=True,
                                          report_to=[], save_strategy="no", logging_strategy="no",
                                          disable_tqdm=True, seed=0)
    return transformers.Trainer(model=model, args=args, train_dataset=_Rows(), **kwargs)


def test_trainer_with_compute_loss_func(tmp_path):
    model = bert_classifier()
    before = model.classifier.weight.detach().clone()
    calls = []

    def loss_func(outputs, labels, num_items_in_batch=None):
        calls.append(int(num_items_in_batch))
        return fhf.zlpr_loss(outputs, labels, num_items_in_batch=num_items_in_batch)

    result = _trainer(model, tmp_path, compute_loss_func=loss_func).train()
    assert calls and set(calls) == {2 * 4 * LABELS}  # the accumulated batch's label entries
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.classifier.weight, before)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_trainer_with_apply_zlpr(tmp_path, monkeypatch, fused):
    model = fhf.apply_zlpr(bert_classifier(), fused=fused)
    seen = []
    name = "_fused_zlpr_forward" if fused else "_zlpr"
    original = getattr(fhf, name)

    def spy(*args):
        seen.append(args[-1])  # num_items_in_batch
        return original(*args)

    before = model.classifier.weight.detach().clone()
    monkeypatch.setattr(fhf, name, spy)
    result = _trainer(model, tmp_path).train()
    assert seen and {int(n) for n in seen} == {2 * 4 * LABELS}
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.classifier.weight, before)


# ---- LST on Hugging Face backbones -----------------------------------------------------------------

def bert_backbone():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    return model, [model.embeddings, *model.encoder.layer]


def t5_backbone():
    config = transformers.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   dropout_rate=0.0, relative_attention_num_buckets=8,
                                   relative_attention_max_distance=16)
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(config).eval()
    return model, [model.encoder.embed_tokens, *model.encoder.block]


@pytest.mark.parametrize("build", [bert_backbone, t5_backbone], ids=["bert", "t5-encoder"])
def test_lst_from_hooks_trains_without_touching_the_backbone(build):
    backbone, modules = build()
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    torch.manual_seed(1)
    side = fastnotes.LadderSideNetwork.from_hooks(backbone, modules, HIDDEN, reduction=4, n_heads=2)
    head = torch.nn.Linear(HIDDEN, 2)
    assert not any(p is q for p in side.parameters() for q in backbone.parameters())
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (8, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[3, 6:] = 0
    target = ((ids == 5).sum(1) > (ids == 6).sum(1)).long()  # any fixed labels: the batch is memorised
    h0, states = side.backbone_states(input_ids=ids, attention_mask=mask)
    assert h0.grad_fn is None and all(s.grad_fn is None for s in states.values())  # no backbone graph
    opt = torch.optim.Adam([*side.parameters(), *head.parameters()], lr=1e-2)
    losses = []
    for _ in range(15):
        out = side(input_ids=ids, attention_mask=mask)
        loss = torch.nn.functional.cross_entropy(head(out.mean(1)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert all(p.grad is not None for p in side.ladders.parameters())
    assert side.side_input.weight.grad is not None
