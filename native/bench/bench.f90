! Per-call latency of a model through Caldera's Fortran module (a rank-2 model such as the 8-64-64-4 closure MLP,
! or a rank-4 field model): one JSON line, microseconds per call. Set OMP_NUM_THREADS for the thread count.
!   caldera_bench_f90 PACKAGE.pt2|EXPORT_DIR BATCH ITERATIONS
program bench
  use, intrinsic :: iso_fortran_env, only: real32, int64
  use caldera
  implicit none
  type(caldera_model) :: model
  character(len=4096) :: path, arg
  integer :: batch, iterations, i, status
  integer(int64), allocatable :: xs(:), ys(:)
  real(real32), allocatable :: x2(:,:), y2(:,:), x4(:,:,:,:), y4(:,:,:,:)
  real(8), allocatable :: us(:)
  integer(int64) :: t0, t1, rate

  call get_command_argument(1, path)
  call get_command_argument(2, arg)
  read(arg, *) batch
  call get_command_argument(3, arg)
  read(arg, *) iterations
  if (caldera_load(model, trim(path)) /= CALDERA_OK) then
    write(0, '(a)') 'caldera_bench_f90: ' // caldera_last_error()
    error stop 1
  end if
  status = caldera_input_shape(model, 1, xs)
  status = caldera_output_shape(model, 1, ys)
  where (xs < 0) xs = batch
  where (ys < 0) ys = batch
  allocate(us(iterations))
  call system_clock(count_rate=rate)
  if (size(xs) == 2) then
    allocate(x2(xs(1), xs(2)), y2(ys(1), ys(2)))
    x2 = 0.5
    do i = 1, min(iterations, 200)
      status = caldera_run(model, x2, y2)
    end do
    do i = 1, iterations
      call system_clock(t0)
      status = caldera_run(model, x2, y2)
      call system_clock(t1)
      us(i) = real(t1 - t0, 8) * 1d6 / real(rate, 8)
    end do
  else if (size(xs) == 4) then
    allocate(x4(xs(1), xs(2), xs(3), xs(4)), y4(ys(1), ys(2), ys(3), ys(4)))
    x4 = 0.5
    do i = 1, min(iterations, 20)
      status = caldera_run(model, x4, y4)
    end do
    do i = 1, iterations
      call system_clock(t0)
      status = caldera_run(model, x4, y4)
      call system_clock(t1)
      us(i) = real(t1 - t0, 8) * 1d6 / real(rate, 8)
    end do
  else
    write(0, '(a)') 'caldera_bench_f90: rank-2 or rank-4 models only'
    error stop 2
  end if
  if (status /= CALDERA_OK) then
    write(0, '(a)') 'caldera_bench_f90: ' // caldera_last_error()
    error stop 1
  end if
  call sort(us)
  write(*, '(a, a, a, i0, a, i0, a, f0.3, a, f0.3, a, f0.3, a)') '{"caller": "fortran", "model": "', trim(path), &
    '", "batch": ', batch, ', "iterations": ', iterations, ', "caldera_us": {"p50": ', us(iterations / 2 + 1), &
    ', "p99": ', us(max(1, (iterations * 99) / 100)), ', "mean": ', sum(us) / iterations, '}}'
  call caldera_free(model)

contains

  ! A heap sort: n log n for 1e5 samples without a library.
  subroutine sort(a)
    real(8), intent(inout) :: a(:)
    integer :: n, i
    real(8) :: t
    n = size(a)
    do i = n / 2, 1, -1
      call sift(a, i, n)
    end do
    do i = n, 2, -1
      t = a(1); a(1) = a(i); a(i) = t
      call sift(a, 1, i - 1)
    end do
  end subroutine sort

  subroutine sift(a, start, last)
    real(8), intent(inout) :: a(:)
    integer, intent(in) :: start, last
    integer :: root, child
    real(8) :: t
    root = start
    do while (2 * root <= last)
      child = 2 * root
      if (child < last) then
        if (a(child) < a(child + 1)) child = child + 1
      end if
      if (a(root) >= a(child)) return
      t = a(root); a(root) = a(child); a(child) = t
      root = child
    end do
  end subroutine sift
end program bench
