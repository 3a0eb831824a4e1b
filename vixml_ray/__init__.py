"""ViXML on Ray."""
