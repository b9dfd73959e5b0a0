"""Task data, following TRL's SFT dataset formats: JSONL in, tokenized rows out.

:mod:`.examples` reads the files (the four formats, line-numbered errors),
:mod:`.tokenize` turns an example into token ids with labels on the completion,
:mod:`.tasks` samples every task and builds the datasets a stage trains on.
"""
