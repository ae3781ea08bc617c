from dtr_scale.data_prep.cli import main

main()
