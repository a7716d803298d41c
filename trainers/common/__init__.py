"""What every trainer shares: the Run contract, config parsing, data access, seeding."""
