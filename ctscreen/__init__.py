"""ctscreen: an open inference cluster that screens chest CT studies for COVID-19 pneumonia."""

__version__ = "0.1.0"
