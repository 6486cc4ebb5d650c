"""The recipe: its sections, the schema that checks them (every problem at once), loading and overrides, and the
task registry the schema validates against. May import the wings below it (launch) and errors."""
