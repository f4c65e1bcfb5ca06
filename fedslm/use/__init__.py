"""Using the shared model once a federation has produced it.

- `export`: base + global adapter merged, parity-checked, int8 copy; `card`: its model card;
- `chat`: generate / chat through the chat template, and batched greedy answers;
- `evaluate`: perplexity / choice / generate on held-out data; `eval_data`: which rows;
- `scoring`: option log-likelihoods, exact match, contains-answer, macro-F1.
"""
