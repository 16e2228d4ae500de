"""The quickstart does what its docstring says: trains the MoE classifier it describes, prints the loss, the test
accuracy and a table whose digit rows (first-choice shares) and load row (shares of all top-2 choices) sum to 1."""

import re

import torch

from moezoo.app import quickstart

STEPS = 40  # ~2 s; already far above chance (0.1)


def test_the_model_is_the_one_described():
    model = quickstart.DigitsMoE()
    assert model.embed.in_features == 64 and model.head.out_features == 10  # one token per 8x8 digit, 10 classes
    assert model.moe.num_experts == 8
    assert model.moe.top_k == 2


def test_it_prints_the_loss_the_accuracy_and_a_table_of_shares(capsys):
    quickstart.main(["--steps", str(STEPS)])
    out = capsys.readouterr().out
    assert re.search(r"^step    0  loss \d+\.\d{3}$", out, re.M)
    assert re.search(rf"^step {STEPS - 1:4d}  loss \d+\.\d{{3}}$", out, re.M)  # the last step too
    accuracy = float(re.search(rf"^test accuracy (\d\.\d+) after {STEPS} steps \(\d+\.\d s on CPU\)$", out, re.M)[1])
    assert accuracy > 0.5
    header = re.search(r"^digit \| (.*)$", out, re.M)[1].split()
    assert header == [f"e{e}" for e in range(8)]
    rows = {int(m[1]): [float(v) for v in m[2].split()] for m in re.finditer(r"^  (\d)   \| (.*)$", out, re.M)}
    load = [float(v) for v in re.search(r"^load  \| (.*)$", out, re.M)[1].split()]
    assert sorted(rows) == list(range(10))
    for shares in [*rows.values(), load]:
        assert len(shares) == 8
        assert abs(sum(shares) - 1) <= 8 * 0.005 + 1e-9  # eight values rounded to 2 decimals


def test_the_table_counts_first_choices_per_digit():
    # Against a count by hand: a token's first choice is its largest router logit (softmax keeps the order),
    # the logits being the router's weights applied to the normalised embedding.
    torch.manual_seed(0)
    model = quickstart.DigitsMoE().eval()
    x = torch.rand(30, 64)
    y = torch.arange(30) % 10
    table = quickstart.routing_table(model, x, y).splitlines()
    with torch.no_grad():
        logits = model.norm(model.embed(x)) @ model.moe.router.weight.T
    first = logits.argmax(-1).tolist()
    for digit in range(10):
        chosen = [first[i] for i in range(30) if y[i] == digit]
        expected = " ".join(f"{chosen.count(e) / len(chosen):4.2f}" for e in range(8))
        assert table[1 + digit] == f"  {digit}   | {expected}"
