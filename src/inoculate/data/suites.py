"""Data suites: which source plays which role in align, attack and evaluate.

A suite names, for one experimental protocol, the harmful source (with refusals) and its
splits for the defender, the attacker and the evaluation; the general-dialogue source; and the
benign fine-tuning tasks. Every field can be overridden per run (``harmful_data=...``).

Who reads which harmful records:

* The defender takes the first ``num_samples`` of its part of the harmful train split, the
  attacker the last ``n`` of its part of the attack split; evaluation reads the test split,
  a held-out file.
* When the train and attack splits are different files (the starter set's ``train`` and
  ``attack``), each side has its whole split.
* When they are the same split (BeaverTails' refusal pairs have only ``train`` and ``test``),
  the suite's ``attack_reserve`` cuts it in two: the last ``attack_reserve`` records are the
  attacker's only and the defender never reads them, whatever ``num_samples`` and ``n`` are.
  A suite that shares the split must reserve (checked when it is built), so the defender's and
  the attacker's records of the suite's harmful source never overlap.
* The cut applies to the suite's harmful source (``DataSuite.harmful``). An attack whose
  ``harmful_data`` names another source (AdvBench, the BeaverTails QA file) reads that source's
  whole split: data the defender never read, unless its own ``harmful_data`` names that source.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..registry import Registry


@dataclass(frozen=True)
class DataSuite:
    harmful: str
    harmful_train_split: str
    harmful_attack_split: str
    harmful_test_split: str
    general: str
    general_train_split: str
    general_test_split: str
    # task name -> (source, train split, test split)
    tasks: dict = field(default_factory=dict)
    # when harmful_train_split == harmful_attack_split: the last attack_reserve records of that
    # split belong to the attacker alone (the defender reads only the records before them)
    attack_reserve: int = 0

    def __post_init__(self):
        if self.attack_reserve < 0:
            raise ValueError(f"attack_reserve must be >= 0, got {self.attack_reserve}")
        if self.shares_harmful_split and not self.attack_reserve:
            raise ValueError(
                f"the defender and the attacker both read harmful split "
                f"{self.harmful_train_split!r} of {self.harmful!r}: set attack_reserve (the records "
                f"at its end kept for the attacker) so their data cannot overlap")

    @property
    def shares_harmful_split(self) -> bool:
        return self.harmful_train_split == self.harmful_attack_split

    def cuts(self, source: str) -> bool:
        """Whether reads of `source` are cut into a defender part and an attacker part."""
        if not self.shares_harmful_split:
            return False
        from .sources import SOURCES

        return SOURCES.get(source).name == SOURCES.get(self.harmful).name

    def defender_part(self, records: list, source: str) -> list:
        """The records of the harmful train split the defender may read (in file order)."""
        if not self.cuts(source):
            return list(records)
        return list(records[:max(0, len(records) - self.attack_reserve)])

    def attacker_part(self, records: list, source: str) -> list:
        """The records of the harmful attack split the attacker may read (in file order)."""
        if not self.cuts(source):
            return list(records)
        return list(records[-self.attack_reserve:])


SUITES: Registry[DataSuite] = Registry("data suite")

_PAPER_TASKS = {"sst2": ("sst2", "train", "validation"), "ag_news": ("ag_news", "train", "test"),
                "gsm8k": ("gsm8k", "train", "test")}

SUITES.register("starter", DataSuite(
    harmful="starter", harmful_train_split="train", harmful_attack_split="attack",
    harmful_test_split="test", general="starter_general", general_train_split="train",
    general_test_split="test",
    tasks={"sst2": ("starter_sst2", "train", "test"), "ag_news": ("starter_ag_news", "train", "test"),
           "gsm8k": ("starter_gsm8k", "train", "test")}))

# The refusal pairs have one train split for both sides: its last 1000 records are the
# attacker's (the largest protocol attack, SEAM's, takes 1000 harmful examples; the CTRAP
# protocol's take at most 500). The defender gets the rest: 3516 of the 4516 pairs in the
# offline copy (the CTRAP protocol's 5000 need a larger copy).
_BEAVERTAILS_ATTACK_RESERVE = 1000

# The CTRAP / Huang-group protocol: BeaverTails refusal pairs, UltraChat as general dialogue.
SUITES.register("beavertails", DataSuite(
    harmful="beavertails_refusals", harmful_train_split="train", harmful_attack_split="train",
    harmful_test_split="test", general="ultrachat", general_train_split="train",
    general_test_split="test", tasks=_PAPER_TASKS, attack_reserve=_BEAVERTAILS_ATTACK_RESERVE))

# Same with Alpaca as the general / benign stream (SEAM's choice; also what ../shared/data has).
SUITES.register("beavertails-alpaca", DataSuite(
    harmful="beavertails_refusals", harmful_train_split="train", harmful_attack_split="train",
    harmful_test_split="test", general="alpaca", general_train_split="train",
    general_test_split="test", tasks=_PAPER_TASKS, attack_reserve=_BEAVERTAILS_ATTACK_RESERVE))
