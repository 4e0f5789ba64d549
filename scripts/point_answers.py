"""What a defended model writes at the points its defense's probe reaches, with and without the
collapse word (docs/methods/ctrap-smollm2.md, round 37).

    python scripts/point_answers.py RUN/align                        # the run's own simulated attack
    python scripts/point_answers.py RUN/align --samples 20 --set ctrap.alpha=0.02 ctrap.trap_steps=4

Runs the alignment monitor (`monitor_samples`, with `monitor_masked`) once on the finished model
of an align run: the greedy answers to the last --samples harmful prompts of the test split at θ
and at every point of the defense's probe (CTRAP: the simulated attacker's θ_1..θ_K, the same
step as training, on held-out batches), each a second time with every token that begins the
collapse word suppressed. It prints, per point, the collapse-token share and the keyword
judge's degenerate / refusal / compliant counts of the plain and the masked answers, and with
--show the answers. A trap that costs an attacker something collapses a model that would answer
compliantly underneath; one whose masked answers are refusals collapses what the model would
have refused anyway. --set KEY=VALUE changes the run's config before the probe (the defense's
options: probe the same model along another simulated attack, e.g. farther or more steps).
--weights DIR probes another align run's model along RUN's simulated attack (an SFT model, say:
where a path of that kind lands on a model without a trap).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from inoculate.config import parse_overrides
from inoculate.defenses import DEFENSES
from inoculate.evaluation.judges import keyword_label
from inoculate.models import load_model, pick_device
from inoculate.pipeline import _align_monitor, align_config


def counts(answers: list) -> str:
    labels = [keyword_label(a) for a in answers]
    compliant = len(labels) - labels.count("degenerate") - labels.count("refusal")
    return f"{labels.count('degenerate')} / {labels.count('refusal')} / {compliant}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="an align run directory (its config.yaml and model/)")
    ap.add_argument("--samples", type=int, default=20, help="held-out harmful prompts (the test split's last)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--weights", default="", help="probe this align run's model instead of RUN's")
    ap.add_argument("--show", action="store_true", help="print the answers too")
    args = ap.parse_args(argv)
    run = Path(args.run)
    values = {k: v for k, v in yaml.safe_load((run / "config.yaml").read_text()).items() if k != "stage"}
    values.update(parse_overrides(args.set))
    values.update(monitor_samples=args.samples, monitor_masked=True, select_by="", select_limits=[])
    cfg, dcfg, _ = align_config(values)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    weights = Path(args.weights or run)
    loaded = load_model(str(weights), keep_adapter=True, device=device, dtype=cfg.dtype)
    model, tok = loaded.model, loaded.tokenizer
    if not any(p.requires_grad for p in model.parameters()):
        model.requires_grad_(True)
    defense = DEFENSES.get(cfg.defense)(dcfg, cfg.per_device_train_batch_size)
    defense.setup(model, tok)
    logged = _align_monitor(cfg, dcfg, defense, tok, device)(model)
    prefix = f"{defense.name}/point/"
    points = sorted({k[len(prefix):].split("/")[0] for k in logged
                     if k.startswith(prefix + "step") and k.endswith("/answers")})
    rows = [("θ", "")] + ([(p, f"{prefix}{p}/") for p in points] or [("point", prefix)])
    print(f"{weights} along {run}'s probe: {args.samples} held-out harmful prompts; degenerate / refusal / compliant")
    print(f"{'where':8} {'error share':>11}  {'answers':>12}  {'masked':>12}")
    for name, key in rows:
        if f"{key}answers" not in logged:
            continue
        print(f"{name:8} {logged[key + 'collapse_token_share']:11.1%}  {counts(logged[key + 'answers']):>12}"
              f"  {counts(logged[key + 'masked_answers']):>12}")
        if args.show:
            for plain, masked in zip(logged[key + "answers"], logged[key + "masked_answers"]):
                print(f"    {plain!r}\n      masked: {masked!r}")


if __name__ == "__main__":
    main()
