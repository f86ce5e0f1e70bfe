"""DICOM networking: the listener (SCP), the sender (SCU), TLS, routing and metrics."""
