"""Writes the small parquet fixtures of crates/lopper-data/tests/ with pyarrow, in the hub's
schemas (Salesforce/wikitext, allenai/ai2_arc, aps/super_glue boolq). Run from the repo root:
    python scripts/make_parquet_fixtures.py   (needs `pip install pyarrow`)
"""
import pyarrow as pa
import pyarrow.parquet as pq

D = "crates/lopper-data/tests/fixtures/"

pq.write_table(
    pa.table({"text": [" = Robert Boulter = \n", "", " Robert Boulter is an English actor . \n", ""]}),
    D + "wikitext-test.parquet",
    compression="snappy",
)
pq.write_table(
    pa.table(
        {
            "id": ["Mercury_7175875", "Q2"],
            "question": [
                "An astronomer observes that a planet rotates faster after a meteorite impact. "
                "Which is the most likely effect of this increase in rotation?",
                "Which is a gas?",
            ],
            "choices": [
                {
                    "text": [
                        "Planetary density will decrease.",
                        "Planetary years will become longer.",
                        "Planetary days will become shorter.",
                        "Planetary gravity will become stronger.",
                    ],
                    "label": ["A", "B", "C", "D"],
                },
                {"text": ["ice", "steam", "rock"], "label": ["1", "2", "3"]},
            ],
            "answerKey": ["C", "2"],
        }
    ),
    D + "arc-test.parquet",
    compression="zstd",
)
pq.write_table(
    pa.table(
        {
            "question": ["do iran and afghanistan speak the same language"],
            "passage": ["Persian language -- Persian is a Western Iranian language."],
            "idx": pa.array([0], pa.int32()),
            "label": pa.array([1], pa.int64()),
        }
    ),
    D + "boolq-validation.parquet",
)
