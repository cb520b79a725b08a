"""Names of the internal columns shared by the driver and the Ray workers (a light import for workers)."""

POSITION = "__pos"  # the entity row's position in the entity set
TS = "__ts"
CREATED = "__created"


def key_column(index: int) -> str:
    return f"__k{index}"


def feature_column(index: int) -> str:
    return f"__f{index}"
