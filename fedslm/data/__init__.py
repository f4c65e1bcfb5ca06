"""Data for each site: generators, chat formatting and answer-only loss masks."""
