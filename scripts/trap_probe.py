"""Probe a defended model's collapse trap (docs/methods/ctrap-smollm2.md).

    python scripts/trap_probe.py RUN/align                       # along harmful-gradient directions
    python scripts/trap_probe.py RUN/align --attack sgd:0.1:12 adamw:5e-5:80   # along attack paths

RUN/align is an align run directory holding a LoRA adapter (the probe moves it) or full weights
(the probe moves all of them; with --fresh-lora R:ALPHA it adds a fresh LoRA adapter of rank R
and lora_alpha ALPHA on the attacker's default targets and moves that, as the merge-mode attacker
of rounds 11-31 does; its B starts at zero, so use --attack then, not the directions).
Data come from the run's own config
(suite, data_dir): the defender's harmful examples, the attacker's harmful examples (disjoint
from the defender's), and held-out general answers.

Directions: for the normalized harmful gradient ĝ of several batches (defender's, attacker's)
and a random direction, move θ − t·ĝ for several t and print the collapse cross-entropy (CE to
the collapse token at every answer position) on held-out general answers and on harmful
answers, and the harmful CE. A trap that generalizes collapses along ĝ of unseen batches and not
along a random direction. The sign of the attacker batch's gradient is AdamW's first update
(ctrap.step_direction=sign); its cosine to ĝ is printed. A trap that is selective does not
collapse along the gradient of a benign task batch (SST-2, the benign attack's data) or along
its sign; the cosines of the benign and harmful directions, raw and signed, are printed.

Attack paths: plain SGD or AdamW (no weight decay) on the attacker's harmful examples, batch 4,
continuing the defended adapter; after every step the general collapse CE and the harmful CE,
and where the attacker is: its distance ‖θ_k − θ‖ from the defended weights, and the cosine of
θ_k − θ with −ĝ and with −sign(g) of its first batch (the directions of a simulated step of
ctrap.step_direction gradient and sign; a normalized simulated step has length ctrap.alpha).
Each line also gives the RMS of the last residual stream (the final norm's input) at the harmful
and at the general answers' positions (ctrap.collapse_rms raises it at the simulated points),
and on the attack paths the norm of the step's gradient, as the optimizer sees it, and the
length of the step taken. `--every N` prints every N-th step of an attack path.
"""
from __future__ import annotations

import argparse
import random

import torch
import yaml

from inoculate.data.encode import collate
from inoculate.defenses.base import global_norm, token_ce
from inoculate.defenses._layers import final_norm_input
from inoculate.defenses.ctrap import answer_rms
from inoculate.evaluation.metrics import collapse_token_id
from inoculate.models import add_lora, load_model
from inoculate.pipeline import (_encode, _suite, align_config, attacker_harmful_records,
                                defender_harmful_records, general_records, task_records)

DISTANCES = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 4.0)


def cosine(a, b) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b)) / (global_norm(a) * global_norm(b)))


class Probe:
    def __init__(self, run: str, collapse_text: str, fresh_lora: str = ""):
        values = {k: v for k, v in yaml.safe_load(open(f"{run}/config.yaml")).items() if k != "stage"}
        self.cfg, _, _ = align_config(values)
        self.run = run
        self.collapse_text = collapse_text
        self.fresh_lora = fresh_lora
        self.load()
        suite = _suite(self.cfg)
        self.defender = defender_harmful_records(self.cfg)[:100]
        self.attacker = attacker_harmful_records(self.cfg)[-80:]
        self.general = self.batch(general_records(self.cfg, suite.general_test_split, limit=10), "response")
        self.harmful = self.batch(self.attacker[:8], "response")
        self.benign = task_records(self.cfg, "sst2", train=True, limit=4) if "sst2" in suite.tasks else []

    def load(self):
        loaded = load_model(self.run, keep_adapter=True)
        self.model, self.tok = loaded.model, loaded.tokenizer
        if self.fresh_lora:
            r, alpha = self.fresh_lora.split(":")
            torch.manual_seed(0)
            self.model = add_lora(self.model, r=int(r), alpha=float(alpha), dropout=0.0)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise SystemExit(f"{self.run} holds no trainable weights to probe")
        self.e = collapse_token_id(self.tok, self.collapse_text)

    def batch(self, records, target):
        return collate(_encode(records, self.tok, self.cfg, target), self.tok.pad_token_id)

    def logits(self, b):
        return self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    @torch.no_grad()
    def ce(self, b, collapse: bool) -> float:
        self.model.eval()
        labels = torch.where(b["labels"] != -100, self.e, -100) if collapse else b["labels"]
        return float(token_ce(self.logits(b), labels))

    @torch.no_grad()
    def rms(self, b) -> float:
        """The geometric mean RMS of the final norm's input at the answer positions."""
        self.model.eval()
        with final_norm_input(self.model) as seen:
            self.logits(b)
        return answer_rms(seen[-1], b["labels"])

    def state(self) -> str:
        return (f"general collapse CE {self.ce(self.general, True):6.2f}  harmful collapse CE "
                f"{self.ce(self.harmful, True):6.2f}  harmful CE {self.ce(self.harmful, False):5.2f}"
                f"  RMS harmful {self.rms(self.harmful):.4g} general {self.rms(self.general):.4g}")

    def gradient(self, records):
        b = self.batch(records, "response")
        loss = token_ce(self.logits(b), b["labels"])
        return [g.detach() for g in torch.autograd.grad(loss, self.params)]

    def along(self, name, direction):
        norm = float(global_norm(direction))
        backup = [p.detach().clone() for p in self.params]
        print(f"{name} (‖g‖ = {norm:.3f})")
        for t in DISTANCES:
            with torch.no_grad():
                for p, p0, d in zip(self.params, backup, direction):
                    p.copy_(p0 - t * d / norm)
            print(f"  t = {t:<4}  {self.state()}", flush=True)
        with torch.no_grad():
            for p, p0 in zip(self.params, backup):
                p.copy_(p0)

    def directions(self):
        torch.manual_seed(0)
        self.along("defender batch 0-3", self.gradient(self.defender[0:4]))
        self.along("defender batch 40-43", self.gradient(self.defender[40:44]))
        g = self.gradient(self.attacker[0:4])
        self.along("attacker batch 0-3 (unseen)", g)
        signs = [x.sign() for x in g]
        self.along(f"sign of attacker batch 0-3 (AdamW's first step; cos to ĝ = {cosine(g, signs):.3f})", signs)
        self.along("attacker batch 0-39 (unseen)", self.gradient(self.attacker[0:40]))
        if self.benign:
            b = self.gradient(self.benign)
            b_signs = [x.sign() for x in b]
            self.along(f"benign SST-2 batch 0-3 (cos to attacker ĝ = {cosine(b, g):.3f})", b)
            self.along(f"sign of benign SST-2 batch 0-3 (cos to the attacker's sign = "
                       f"{cosine(b_signs, signs):.3f})", b_signs)
        self.along("random direction", [torch.randn_like(p) for p in self.params])

    def attack(self, spec: str, every: int = 1):
        name, lr, steps = spec.split(":")
        lr, steps = float(lr), int(steps)
        self.load()
        opt = (torch.optim.SGD(self.params, lr=lr) if name == "sgd"
               else torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0))
        rng, order = random.Random(0), list(range(len(self.attacker)))
        start = [p.detach().clone() for p in self.params]
        first = None  # −ĝ and −sign(g) of the first batch
        last = ""  # the last step's gradient norm and length
        print(f"attack {spec}")
        for step in range(steps + 1):
            where = ""
            if first is not None:
                moved = [p.detach() - p0 for p, p0 in zip(self.params, start)]
                where = (f"  ‖θ_k − θ‖ {float(global_norm(moved)):6.3f}  cos to −ĝ {cosine(moved, first[0]):6.3f}"
                         f"  to −sign(g) {cosine(moved, first[1]):6.3f}")
            if step % every == 0 or step == steps:
                print(f"  step {step:3d}  {self.state()}{where}{last}", flush=True)
            if step == steps:
                break
            if step % 20 == 0:
                rng.shuffle(order)
            b = self.batch([self.attacker[order[(step * 4 + i) % len(order)]] for i in range(4)], "response")
            if first is None:
                self.model.eval()  # the direction of a simulated step, as the trap computes it (no dropout)
                g = self.gradient([self.attacker[order[i]] for i in range(4)])
                first = ([-x for x in g], [-x.sign() for x in g])
            self.model.train()
            loss = token_ce(self.logits(b), b["labels"])
            opt.zero_grad()
            loss.backward()
            before = [p.detach().clone() for p in self.params]
            opt.step()
            last = (f"  ‖g‖ {float(global_norm([p.grad for p in self.params])):.3f}  step length "
                    f"{float(global_norm([p.detach() - b for p, b in zip(self.params, before)])):.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="an align run directory with a LoRA adapter")
    ap.add_argument("--attack", nargs="*", default=None,
                    help="OPTIM:LR:STEPS paths to follow (OPTIM sgd or adamw) instead of the directions")
    ap.add_argument("--collapse-text", default="an error")
    ap.add_argument("--fresh-lora", default="", metavar="R:ALPHA",
                    help="add a fresh LoRA adapter (rank R, lora_alpha ALPHA) to a full-weight run")
    ap.add_argument("--every", type=int, default=1, help="print every N-th step of an attack path")
    args = ap.parse_args()
    probe = Probe(args.run, args.collapse_text, args.fresh_lora)
    if args.attack:
        for spec in args.attack:
            probe.attack(spec, args.every)
    else:
        probe.directions()


if __name__ == "__main__":
    main()
