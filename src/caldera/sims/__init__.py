"""Built-in simulations that make data for examples and tests."""
