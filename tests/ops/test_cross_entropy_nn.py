"""torchfast.nn.CrossEntropyLoss and LinearCrossEntropyLoss against torch.nn.CrossEntropyLoss (+ nn.Linear):
forward and gradients, the arguments they refuse, state_dicts, shared and tied parameters; and a
convergence test: a small Llama-style LM trained with linear_cross_entropy follows the loss curve of the
same model trained with nn.Linear + F.cross_entropy step by step."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfast
from tests.dropin.models import LlamaStack
from torchfast._util import num_threads
from torchfast.testing import assert_close

OPTIONS = [{}, {"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.1}, {"ignore_index": 3},
           {"label_smoothing": 0.2, "reduction": "sum", "ignore_index": 0}]
TOL = dict(rtol=1e-5, atol=1e-6)


def _ids(options):
    return ",".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def _target(shape, v, ignore_index=-100):
    t = torch.randint(0, v, shape)
    t.view(-1)[::4] = ignore_index
    return t


def _loss_and_grads(loss_fn, inputs, *args):
    y = loss_fn(*inputs, *args)
    grads = torch.autograd.grad(y, inputs, torch.ones_like(y))
    return y, grads


@pytest.mark.parametrize("options", OPTIONS, ids=_ids)
@pytest.mark.parametrize("shape", [(13, 37), (2, 5, 37), (37,)], ids=str)
def test_cross_entropy_loss_matches_torch(options, shape):
    x = (torch.randn(shape) * 3).requires_grad_()
    t = _target(shape[:-1], shape[-1], options.get("ignore_index", -100))
    if x.dim() == 1:  # torch's unbatched form: a scalar target, never ignored
        t = torch.tensor(5)
    expected, expected_grad = _loss_and_grads(nn.CrossEntropyLoss(**options), (x.view(-1, shape[-1]),),
                                              t.reshape(-1))
    got, got_grad = _loss_and_grads(torchfast.nn.CrossEntropyLoss(**options), (x,), t)
    assert got.shape == (t.shape if options.get("reduction") == "none" else ())
    assert_close(got.reshape(-1), expected.reshape(-1), **TOL)
    assert_close(got_grad[0], expected_grad[0].view(shape), **TOL)


def test_cross_entropy_loss_is_a_torch_cross_entropy_loss_with_its_argument_order():
    m = torchfast.nn.CrossEntropyLoss(None, None, 7, None, "sum", 0.25, z_loss=1e-4, softcap=30.0)
    assert isinstance(m, nn.CrossEntropyLoss)
    options = (m.ignore_index, m.reduction, m.label_smoothing, m.z_loss, m.softcap)
    assert options == (7, "sum", 0.25, 1e-4, 30.0)
    assert repr(torchfast.nn.CrossEntropyLoss()) == repr(nn.CrossEntropyLoss()) == "CrossEntropyLoss()"
    assert repr(m) == ("CrossEntropyLoss(ignore_index=7, reduction='sum', label_smoothing=0.25, "
                       "z_loss=0.0001, softcap=30.0)")


def test_cross_entropy_loss_z_loss_and_softcap_are_the_ops():
    x, t = torch.randn(9, 21) * 4, _target((9,), 21)
    m = torchfast.nn.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    assert_close(m(x, t), torchfast.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-3, softcap=5.0), **TOL)


@pytest.mark.parametrize("arg,value", [("weight", torch.ones(5)), ("size_average", False), ("reduce", False)])
def test_cross_entropy_loss_refuses_unsupported_arguments(arg, value):
    with pytest.raises(ValueError, match=f"argument '{arg}' is not supported"):
        torchfast.nn.CrossEntropyLoss(**{arg: value})


def test_cross_entropy_loss_refuses_class_weights_set_later_and_probability_targets():
    m = torchfast.nn.CrossEntropyLoss()
    x = torch.randn(4, 5)
    with pytest.raises(TypeError, match="'target'.*probability targets are not supported"):
        m(x, torch.softmax(torch.randn(4, 5), -1))
    m.weight = torch.ones(5)
    with pytest.raises(ValueError, match="argument 'weight' is not supported"):
        m(x, torch.zeros(4, dtype=torch.long))


def test_cross_entropy_loss_explains_torchs_class_dim_1_layout():
    x, t = torch.randn(2, 7, 3), torch.randint(0, 7, (2, 3))  # torch: [N, C, d1] with target [N, d1]
    with pytest.raises(RuntimeError, match=r"classes in dimension 1.*movedim\(1, -1\)"):
        torchfast.nn.CrossEntropyLoss()(x, t)
    got = torchfast.nn.CrossEntropyLoss()(x.movedim(1, -1), t)
    assert_close(got, F.cross_entropy(x, t), **TOL)


# ---- LinearCrossEntropyLoss ---------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("options", OPTIONS, ids=_ids)
def test_linear_cross_entropy_loss_matches_linear_and_torch_loss(options, bias):
    head = nn.Linear(16, 45, bias=bias)
    loss = torchfast.nn.LinearCrossEntropyLoss.from_linear(copy.deepcopy(head), chunk_size=4, **options)
    h = torch.randn(3, 5, 16, requires_grad=True)
    t = _target((3, 5), 45, options.get("ignore_index", -100))
    params = [h, *head.parameters()]

    def torch_loss(h, *_params):
        logits = head(h)
        return F.cross_entropy(logits.view(-1, 45), t.view(-1), **options).view(
            t.shape if options.get("reduction") == "none" else ())

    expected, expected_grads = _loss_and_grads(torch_loss, params)
    got, got_grads = _loss_and_grads(lambda h, *_p: loss(h, t), [h, *loss.parameters()])
    assert_close(got, expected, **TOL)
    for g, e in zip(got_grads, expected_grads):
        assert_close(g, e, **TOL)


def test_linear_cross_entropy_loss_has_nn_linear_parameters_and_init():
    for bias in (False, True):
        torch.manual_seed(1)
        ref = nn.Linear(24, 50, bias=bias)
        torch.manual_seed(1)
        loss = torchfast.nn.LinearCrossEntropyLoss(24, 50, bias=bias)
        assert list(loss.state_dict()) == list(ref.state_dict())
        for (name, p), (ref_name, q) in zip(loss.named_parameters(), ref.named_parameters()):
            assert name == ref_name and p.shape == q.shape
            assert torch.equal(p, q), f"{name}: not nn.Linear's initialisation"
        loss.load_state_dict(nn.Linear(24, 50, bias=bias).state_dict())
    assert (loss.in_features, loss.vocab, loss.out_features) == (24, 50, 50)
    assert repr(torchfast.nn.LinearCrossEntropyLoss(8, 10, z_loss=1e-4, chunk_size=64)) == (
        "LinearCrossEntropyLoss(in_features=8, vocab=10, bias=False, z_loss=0.0001, chunk_size=64)")


def test_linear_cross_entropy_loss_dtype_and_device_arguments():
    loss = torchfast.nn.LinearCrossEntropyLoss(8, 10, bias=True, dtype=torch.float64)
    assert loss.weight.dtype == loss.bias.dtype == torch.float64
    assert torchfast.nn.LinearCrossEntropyLoss(8, 10, device="meta").weight.is_meta


def test_from_linear_shares_the_parameters():
    head = nn.Linear(16, 30, bias=True)
    loss = torchfast.nn.LinearCrossEntropyLoss.from_linear(head, label_smoothing=0.1)
    assert loss.weight is head.weight and loss.bias is head.bias and loss.label_smoothing == 0.1
    loss(torch.randn(6, 16), torch.randint(0, 30, (6,))).backward()
    assert head.weight.grad is not None and head.bias.grad is not None
    with pytest.raises(TypeError, match="expected an nn.Linear head"):
        torchfast.nn.LinearCrossEntropyLoss.from_linear(nn.Embedding(30, 16))


def test_linear_cross_entropy_loss_refuses_probability_targets():
    loss = torchfast.nn.LinearCrossEntropyLoss(8, 10)
    with pytest.raises(TypeError, match="'target'.*probability targets are not supported"):
        loss(torch.randn(4, 8), torch.rand(4, 10))


def test_tied_embedding_weight_gets_both_gradients():
    emb = nn.Embedding(40, 16)
    head = nn.Linear(16, 40, bias=False)
    head.weight = emb.weight  # tied, as in GPT-2 / Llama 3.2 small models
    loss_fn = torchfast.nn.LinearCrossEntropyLoss.from_linear(head, chunk_size=3)
    tokens = torch.randint(0, 40, (2, 6))
    target = torch.randint(0, 40, (2, 6))

    def step(loss_of):
        emb.weight.grad = None
        h = torch.tanh(emb(tokens))
        loss_of(h).backward()
        return emb.weight.grad.clone()

    got = step(lambda h: loss_fn(h, target))
    expected = step(lambda h: F.cross_entropy(head(h).flatten(0, 1), target.flatten()))
    assert_close(got, expected, **TOL)
    # the gradient really is the sum of the head's and the embedding's parts
    only_head = step(lambda h: loss_fn(h.detach(), target))
    assert not torch.allclose(got, only_head)


# ---- convergence ----------------------------------------------------------------------------------

class TinyLlama(nn.Module):
    """Embedding, the Llama-style decoder stack of tests/dropin/models.py, nn.Linear LM head."""

    def __init__(self, vocab=512, hidden=64, layers=2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.model = LlamaStack(layers=layers, hidden_size=hidden, num_heads=4, intermediate_size=128)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def hidden(self, tokens):
        return self.model(self.embed_tokens(tokens))


def _train(model, loss_of, batches):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    curve = []
    for tokens in batches:
        h = model.hidden(tokens[:, :-1])  # causal LM: position i predicts token i + 1
        loss = loss_of(model, h, tokens[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return curve


def test_linear_cross_entropy_follows_the_f_cross_entropy_loss_curve():
    torch.manual_seed(0)
    vocab, steps = 512, 30
    reference = TinyLlama(vocab)
    fused = copy.deepcopy(reference)
    # A learnable pattern (each sequence counts up from a random start) so the loss really falls.
    starts = torch.randint(0, vocab, (steps, 4, 1))
    batches = list((starts + torch.arange(17)) % vocab)  # 4 x 16 = 64 predicted tokens per step

    def unfused(model, h, target):
        return F.cross_entropy(model.lm_head(h).flatten(0, 1), target.flatten())

    def chunked(model, h, target):  # 64 tokens in chunks of 24: three chunks, the last one short
        return torchfast.linear_cross_entropy(h, model.lm_head.weight, target, chunk_size=24)

    with num_threads(1):
        expected = _train(reference, unfused, batches)
        got = _train(fused, chunked, batches)
    diffs = [abs(a - b) for a, b in zip(got, expected)]
    worst = max(range(steps), key=diffs.__getitem__)
    assert diffs[worst] <= 1e-4, (
        f"step {worst}: loss {got[worst]:.6f} vs F.cross_entropy {expected[worst]:.6f} "
        f"(|diff| {diffs[worst]:.2e}); curves: {got} vs {expected}")
    assert expected[-1] < expected[0] - 1.0, f"the model did not learn: {expected}"
