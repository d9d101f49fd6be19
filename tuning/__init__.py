"""The library the top-level scripts share, in floors: a module imports only from its own floor or below, and
nothing here imports a script (tests/test_layout.py checks it, reading the imports).

    cli.py, rundir.py  0  flags from a script's constants and user errors; what a run leaves in its directory
    data/              1  records, templates, SFT examples, preference pairs, batch layouts, the token cache
    models/            2  devices, loading, LoRA, the reward model's scores, answer log-probs, packing checks
    smoke.py           2  the offline --smoke preset: generated tasks, a small tokenizer, a tiny GPT-2
    generation/        3  answers as inference.py gives them, and the comparison page (which imports them)
    runs/              3  the run layer of every training script: lifecycle, start-up checks, launchers,
                          the Trainer's additions, plots
    preference/        4  the reward model's and the aligning trainers (DPO, RLOO) and their reports

Generation never imports training code (runs/, preference/).
"""
