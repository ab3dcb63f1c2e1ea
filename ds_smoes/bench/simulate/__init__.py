"""`python -m ds_smoes.bench simulate`: expected bytes per token for 2..64 EP ranks and 8..256 experts.

    command.py   the command
    model.py     the statistical model of the routes (RouterProfile: own-route histograms per modality)
    report.py    its table and plot
"""
