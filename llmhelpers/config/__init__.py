"""The run's settings: the project's own (`project`), the three library configs nested in it, profiles from configs/."""
