"""nn.Modules and the builders registered for their spec types."""
