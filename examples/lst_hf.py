"""Ladder Side-Tuning on a Hugging Face backbone: LadderSideNetwork.from_hooks on BertModel or T5EncoderModel.

    python examples/lst_hf.py [--backbone bert|t5] [--steps 150]

The backbone is built from a small random config (nothing is downloaded; with a real checkpoint
use BertModel.from_pretrained(...) / T5EncoderModel.from_pretrained(...) the same way) and stays
frozen: from_hooks sets its parameters to requires_grad=False, runs it without an autograd graph
and captures the outputs of the embedding layer (the side input) and of every encoder layer
(the ladders) with forward hooks. Only the side network (width D / r) and a small head train.

Task: sequences of 24 tokens from a vocabulary of 64; the label says whether token 1 occurs more
often than token 2 (ties re-drawn). Printed: held-out accuracy, trainable parameters of LST vs
the backbone, the activation memory saved for backward (LST vs fine-tuning the whole backbone,
counted with torch.autograd.graph.saved_tensors_hooks, parameters excluded), and a check that no
backbone parameter received a gradient.
"""
import argparse

import torch
import transformers

import fastnotes

VOCAB, SEQ, D_MODEL, LAYERS, HEADS, BATCH = 64, 24, 128, 4, 4, 32


def batch(n, gen):
    x = torch.randint(3, VOCAB, (n, SEQ), generator=gen)
    x[torch.rand(n, SEQ, generator=gen) < 0.15] = 1
    x[torch.rand(n, SEQ, generator=gen) < 0.15] = 2
    ones, twos = (x == 1).sum(1), (x == 2).sum(1)
    keep = ones != twos
    return x[keep], (ones > twos)[keep].long()


def backbone(kind):
    """(model, [side-input module, layer_1, ..., layer_n]) for from_hooks."""
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=LAYERS,
                                         num_attention_heads=HEADS, intermediate_size=4 * D_MODEL,
                                         max_position_embeddings=SEQ)
        model = transformers.BertModel(config, add_pooling_layer=False)
        return model, [model.embeddings, *model.encoder.layer]
    config = transformers.T5Config(vocab_size=VOCAB, d_model=D_MODEL, d_kv=D_MODEL // HEADS, d_ff=4 * D_MODEL,
                                   num_layers=LAYERS, num_heads=HEADS, feed_forward_proj="gated-gelu")
    model = transformers.T5EncoderModel(config)
    return model, [model.encoder.embed_tokens, *model.encoder.block]


def saved_bytes(loss_fn):
    """Bytes of activations autograd keeps for backward (parameters excluded), then backward."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return sum(seen.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=["bert", "t5"], default="bert")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--reduction", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    model, modules = backbone(args.backbone)
    model.eval()  # frozen: no dropout in the backbone (the side network has none either)
    side = fastnotes.LadderSideNetwork.from_hooks(model, modules, D_MODEL, reduction=args.reduction, n_heads=4)
    head = torch.nn.Linear(D_MODEL, 2)
    trainable = [*side.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(trainable, lr=3e-3)

    def loss_of(x, y):
        mask = torch.ones_like(x)
        return torch.nn.functional.cross_entropy(head(side(input_ids=x, attention_mask=mask).mean(1)), y)

    for step in range(args.steps):
        x, y = batch(BATCH, gen)
        loss = loss_of(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    x, y = batch(1024, torch.Generator().manual_seed(1))
    with torch.no_grad():
        accuracy = (head(side(input_ids=x).mean(1)).argmax(1) == y).float().mean().item()
    n_side = sum(p.numel() for p in trainable)
    n_backbone = sum(p.numel() for p in model.parameters())
    untouched = all(p.grad is None and not p.requires_grad for p in model.parameters())

    x, y = batch(BATCH, torch.Generator().manual_seed(2))
    lst_bytes = saved_bytes(lambda: loss_of(x, y))
    full = backbone(args.backbone)[0].eval()  # the same architecture, every weight trainable
    full_head = torch.nn.Linear(D_MODEL, 2)
    full_bytes = saved_bytes(lambda: torch.nn.functional.cross_entropy(
        full_head(full(input_ids=x).last_hidden_state.mean(1)), y))

    print(f"backbone {args.backbone}: {LAYERS} layers, width {D_MODEL}; side width {D_MODEL // args.reduction}")
    print(f"held-out accuracy       {accuracy:.3f}")
    print(f"trainable parameters    LST {n_side:,}  vs backbone {n_backbone:,} ({100 * n_side / n_backbone:.1f}%)")
    print(f"saved for backward      LST {lst_bytes / 1e6:.2f} MB  vs full fine-tuning {full_bytes / 1e6:.2f} MB")
    print(f"backbone untouched      {untouched} (no .grad, requires_grad False)")


if __name__ == "__main__":
    main()
