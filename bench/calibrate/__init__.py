"""``bench calibrate``: what the bench's own load generator and the pipeline's process cost on this machine,
side by side with the client library's floor (a bare paho loop), so a capacity sweep knows when the generator,
not the system under test, was the limit. See docs/calibrate.md."""
