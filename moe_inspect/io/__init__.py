"""Reading and writing files: table schemas, atomic export, serving-engine routing records."""
