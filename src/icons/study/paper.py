"""The paper's own numbers for the analyses the miniature study repeats (ICONS, arXiv 2501.00654;
as collected in the project's reference tables), for side-by-side figures. Tasks in icons' order:
vqav2, gqa, vizwiz, sqa, textvqa, pope, mme, mmbench_en, mmbench_cn, llavaw."""

TASKS = ("vqav2", "gqa", "vizwiz", "sqa", "textvqa", "pope", "mme", "mmbench_en", "mmbench_cn", "llavaw")

#: pairwise overlap (%) of the per-task specialist top-20% selections at 7B on LLaVA-665K
TOP20_OVERLAP = (
    (100.0, 47.6, 49.0, 29.4, 28.8, 52.8, 44.0, 26.0, 29.9, 16.7),
    (47.6, 100.0, 25.7, 25.3, 18.9, 60.2, 55.8, 3.3, 9.0, 14.0),
    (49.0, 25.7, 100.0, 28.9, 22.4, 27.1, 23.3, 39.4, 27.4, 23.4),
    (29.4, 25.3, 28.9, 100.0, 28.7, 26.9, 24.8, 25.6, 21.8, 20.1),
    (28.8, 18.9, 22.4, 28.7, 100.0, 21.1, 21.0, 23.5, 27.8, 17.6),
    (52.8, 60.2, 27.1, 26.9, 21.1, 100.0, 65.5, 8.4, 13.3, 14.6),
    (44.0, 55.8, 23.3, 24.8, 21.0, 65.5, 100.0, 9.9, 14.4, 15.5),
    (26.0, 3.3, 39.4, 25.6, 23.5, 8.4, 9.9, 100.0, 67.4, 24.7),
    (29.9, 9.0, 27.4, 21.8, 27.8, 13.3, 14.4, 67.4, 100.0, 22.2),
    (16.7, 14.0, 23.4, 20.1, 17.6, 14.6, 15.5, 24.7, 22.2, 100.0),
)

#: overlap (%) of each specialist's top 20% with the generalist (ICONS) selection (≈: read off a plot)
SPECIALIST_OVERLAP = {"vqav2": 3.27, "vizwiz": 3.3, "gqa": 5.4, "mmbench_en": 8.8, "pope": 11.5, "sqa": 13.0,
                      "mme": 15.3, "textvqa": 18.0, "mmbench_cn": 19.5, "llavaw": 24.21}

#: selection overlap (%) between aggregation methods at 20%
AGGREGATION = ("vote", "mean", "max", "rank", "norm")
AGGREGATION_OVERLAP = (
    (100.0, 53.8, 53.8, 67.9, 70.5),
    (53.8, 100.0, 99.9, 44.4, 44.4),
    (53.8, 99.9, 100.0, 44.2, 44.3),
    (67.9, 44.4, 44.2, 100.0, 75.9),
    (70.5, 44.4, 44.3, 75.9, 100.0),
)
#: relative performance (%) of each aggregation at 20% (printed)
AGGREGATION_REL = {"vote": 98.6, "mean": 96.4, "max": 96.1, "rank": 95.9, "norm": 96.8, "merge": 94.7}

#: relative performance (%) by selection ratio (≈: read off the paper's figure)
RATIO_REL = {"icons": {0.05: 90.9, 0.1: 94.3, 0.2: 98.6, 0.4: 99.2, 0.6: 102.1},
             "random": {0.05: 88.8, 0.1: 91.1, 0.2: 95.8, 0.4: 97.9, 0.6: 98.6}}
