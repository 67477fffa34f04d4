"""``bench capacity``: step the offered rate until the system under test cannot keep up."""
