"""The OpenAI door of a real swarm of the default model, driven by the clients people use."""
