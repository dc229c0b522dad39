"""The OpenAI door: routes, schema, runs, response shapes, tools."""
