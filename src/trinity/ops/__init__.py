"""Operations tooling that runs beside the engine: load driver (`bench`), memory/cost planner (`plan`)."""
