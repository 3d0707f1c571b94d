"""Adapters to the libraries users already run (../shared/DESIGN.md, "Integrations"), one module per
library (fastnotes.integrations.<library>). Each library is optional: importing an adapter without it
raises an ImportError that names what to install."""
